//! Pure download policy: the choices made from the peers' answers (`choice`: version, unit,
//! crowd, order) and the scheduler (`schedule`: windows, picking and rarity, crowd stripes,
//! endgame), events and `now` in, actions out. No tokio, no files, no clock.

pub mod choice;
pub mod schedule;
