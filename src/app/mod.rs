//! The command line: clap types (`args`), running and rendering commands (`cli`, and the folder
//! commands in `folders`), the seed's `#` lines (`shell`), and stdout that never panics
//! (`term`).

pub mod args;
pub mod cli;
mod folders;
pub mod shell;
pub mod term;
