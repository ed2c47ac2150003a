//! Pure download policy: the choice of unit and crowd from the peers' answers (`choice`), the scheduler (windows, picking and rarity, crowd stripes, endgame),
//! events and `now` in, actions out. No tokio, no files, no clock.

pub mod choice;
pub mod schedule;
