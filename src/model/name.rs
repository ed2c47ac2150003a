//! Names of served files, validated: safe to join to `served_files` whether they come from the
//! command line or the network.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Longest file name accepted, in bytes (the usual file-system limit).
pub const MAX_NAME_LEN: usize = 255;

/// A file name that is safe to join to `served_files`: one normal path component.
///
/// No `/`, `\`, NUL or control characters, no leading `.` (which also excludes `.`, `..` and our
/// hidden temporary files), 1–255 bytes. Checked on construction and on deserialization, so a
/// `FileName` from the wire is as safe as one from the command line.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct FileName(String);

/// Why a file name was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid file name {shown:?}: {why}")]
pub struct InvalidName {
    /// The name, shortened if very long.
    pub shown: String,
    /// The rule it broke.
    pub why: &'static str,
}

impl FileName {
    /// Validates `name`.
    pub fn new(name: impl Into<String>) -> Result<Self, InvalidName> {
        let name = name.into();
        let why = if name.is_empty() {
            Some("it is empty")
        } else if name.len() > MAX_NAME_LEN {
            Some("it is longer than 255 bytes")
        } else if name.starts_with('.') {
            Some("it starts with '.'")
        } else if name.contains(['/', '\\']) {
            Some("it contains a path separator")
        } else if name.chars().any(char::is_control) {
            Some("it contains a control character")
        } else {
            None
        };
        match why {
            None => Ok(Self(name)),
            Some(why) => {
                let shown: String = name.chars().take(80).collect();
                Err(InvalidName { shown, why })
            }
        }
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for FileName {
    type Error = InvalidName;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::new(s)
    }
}

impl From<FileName> for String {
    fn from(n: FileName) -> Self {
        n.0
    }
}

impl fmt::Display for FileName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
