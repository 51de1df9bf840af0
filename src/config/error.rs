//! What can be wrong with a config, said so that the user can find the line and fix it.

use std::fmt;
use std::path::PathBuf;

/// Where a config value came from: a line of the file or a `--set` argument.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Location {
    /// A line of the config file (`None`: the file as a whole, e.g. for a missing key).
    File { path: PathBuf, line: Option<usize> },
    /// A `--set key=value` argument, as typed; `index` is its place among the `--set`s.
    Set { index: usize, arg: String },
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::File {
                path,
                line: Some(line),
            } => write!(f, "{}:{line}", path.display()),
            Location::File { path, line: None } => write!(f, "{}", path.display()),
            Location::Set { arg, .. } => write!(f, "--set {arg}"),
        }
    }
}

/// One problem found in a config.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    pub at: Location,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.at, self.message)
    }
}

/// An invalid config file or `--set` override.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file cannot be read.
    #[error("{}: cannot read the config file: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The current directory, where relative paths start, cannot be read.
    #[error("cannot read the current directory, where the config's relative paths start: {source}; run from a folder that exists")]
    WorkingDirectory {
        #[source]
        source: std::io::Error,
    },
    /// The file (or a `--set` value) is not valid YAML.
    #[error("{at}: invalid YAML: {message}{}", column.map(|c| format!(" (column {c})")).unwrap_or_default())]
    Syntax {
        at: Location,
        column: Option<usize>,
        message: String,
    },
    /// Keys or values that fail validation, all of them at once, in file order.
    #[error("{}", list(problems))]
    Invalid { problems: Vec<Problem> },
}

impl ConfigError {
    /// The individual problems (one for a read or syntax error).
    pub fn problems(&self) -> Vec<String> {
        match self {
            ConfigError::Invalid { problems } => problems.iter().map(|p| p.to_string()).collect(),
            other => vec![other.to_string()],
        }
    }
}

fn list(problems: &[Problem]) -> String {
    match problems {
        [one] => one.to_string(),
        many => {
            let mut s = format!("the config has {} problems:", many.len());
            for p in many {
                s.push_str(&format!("\n  {p}"));
            }
            s
        }
    }
}
