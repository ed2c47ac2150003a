//! The command line: clap types (`args`), running and rendering commands (`cli`), the seed's
//! `#` lines (`shell`), and stdout that never panics (`term`).

pub mod args;
pub mod cli;
pub mod shell;
pub mod term;
