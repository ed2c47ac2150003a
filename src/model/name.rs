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

/// Most components a [`FilePath`] may have.
pub const MAX_PATH_DEPTH: usize = 32;
/// Longest [`FilePath`], in bytes.
pub const MAX_PATH_LEN: usize = 1024;

/// A served file's path: relative to `served_files`, `/`-separated, every component a valid
/// [`FileName`] (so no `..`, no hidden component, no empty one), at most [`MAX_PATH_DEPTH`]
/// components and [`MAX_PATH_LEN`] bytes. A file at the top of `served_files` is a path of one
/// component, spelled as its name. Checked on construction and on deserialization, like a name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct FilePath(String);

impl FilePath {
    /// Validates `path`.
    pub fn new(path: impl Into<String>) -> Result<Self, InvalidName> {
        let path = path.into();
        let refuse = |why| {
            let shown: String = path.chars().take(80).collect();
            Err(InvalidName { shown, why })
        };
        if path.len() > MAX_PATH_LEN {
            return refuse("it is longer than 1024 bytes");
        }
        if path.split('/').count() > MAX_PATH_DEPTH {
            return refuse("it has more than 32 components");
        }
        for component in path.split('/') {
            if component.is_empty() && !path.is_empty() {
                return refuse("it has an empty component");
            }
            if let Err(e) = FileName::new(component) {
                return refuse(e.why);
            }
        }
        Ok(Self(path))
    }

    /// The path as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Its components, from the top.
    pub fn components(&self) -> impl Iterator<Item = &str> {
        self.0.split('/')
    }

    /// Whether it is a file at the top of `served_files` (one component).
    pub fn is_top_level(&self) -> bool {
        !self.0.contains('/')
    }

    /// Its last component: the file's own name.
    pub fn file_name(&self) -> &str {
        self.0.rsplit('/').next().unwrap_or(&self.0)
    }

    /// The folder it is in, if not the top.
    pub fn parent(&self) -> Option<&str> {
        self.0.rsplit_once('/').map(|(parent, _)| parent)
    }
}

impl From<FileName> for FilePath {
    fn from(name: FileName) -> Self {
        Self(name.0)
    }
}

impl TryFrom<String> for FilePath {
    type Error = InvalidName;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::new(s)
    }
}

impl From<FilePath> for String {
    fn from(p: FilePath) -> Self {
        p.0
    }
}

impl fmt::Display for FilePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_safe_names_joined_by_slashes() {
        let deep = vec!["d"; MAX_PATH_DEPTH].join("/");
        for ok in ["a", "notes/2026/todo.txt", "with space/ünï.txt", &deep] {
            let p = FilePath::new(ok).unwrap();
            assert_eq!(p.as_str(), ok);
        }
        let p = FilePath::new("notes/2026/todo.txt").unwrap();
        assert_eq!(p.file_name(), "todo.txt");
        assert_eq!(p.parent(), Some("notes/2026"));
        assert!(!p.is_top_level() && FilePath::new("a").unwrap().is_top_level());
        let too_deep = vec!["d"; MAX_PATH_DEPTH + 1].join("/");
        let too_long = format!("{}/{}", "x".repeat(255), "y".repeat(MAX_PATH_LEN - 255));
        for bad in [
            "",
            "/abs",
            "a//b",
            "a/",
            "../etc/passwd",
            "a/../b",
            "a/./b",
            "a/.hidden",
            "a\\b/c",
            "a/nul\0",
            "a/tab\t",
            &too_deep,
            &too_long,
        ] {
            assert!(FilePath::new(bad).is_err(), "{bad:?}");
        }
        // The same rules apply when a path arrives on the wire.
        let wire = postcard::to_stdvec(&"a/../x".to_string()).unwrap();
        assert!(postcard::from_bytes::<FilePath>(&wire).is_err());
    }
}
