//! The command line: clap types (`args`), running and rendering commands (`cli`, and the folder
//! commands in `folders`, `sync` and `status` in `sync`, `discover` in `reach`), the seed's `#`
//! lines (`shell`), and stdout that never panics (`term`).

pub mod args;
pub mod cli;
mod folders;
mod reach;
pub mod shell;
mod sync;
pub mod term;
