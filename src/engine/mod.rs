//! Pure download policy: the scheduler (windows, picking and rarity, crowd stripes, endgame),
//! events and `now` in, actions out. No tokio, no files, no clock.

pub mod schedule;
