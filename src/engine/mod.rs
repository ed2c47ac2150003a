//! Pure download policy: the choices made from the peers' answers (`choice`: version, unit,
//! crowd, order) and the scheduler (`schedule`: windows, picking and rarity, crowd stripes,
//! endgame), events and `now` in, actions out; what a synced folder does with another peer's
//! version of a file (`sync`). No tokio, no files, no clock.

pub mod choice;
pub mod schedule;
pub mod sync;
