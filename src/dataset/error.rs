//! What can be wrong with a dataset, said row by row so that the user can fix it in one go.

use std::path::PathBuf;

/// An invalid dataset.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    /// One problem that stops the check (a missing folder, an unreadable metadata header...).
    #[error("{0}")]
    Invalid(String),
    /// Every problem found in the rows and files, in row order.
    #[error("{}", problems_message(origin, problems, hint.as_deref()))]
    Problems {
        /// The metadata file or the image folder the problems are in.
        origin: String,
        /// One line per problem (`row 7: ...`).
        problems: Vec<String>,
        /// Advice that applies to all of them.
        hint: Option<String>,
    },
    /// An image that passed the check cannot be loaded any more at training time.
    #[error("{}: {reason}", path.display())]
    Image { path: PathBuf, reason: String },
}

/// At most this many problems are printed; the error still holds all of them.
const PROBLEMS_SHOWN: usize = 50;

fn problems_message(origin: &str, problems: &[String], hint: Option<&str>) -> String {
    let mut text = format!(
        "{origin}: {} problem(s) in the dataset; fix them and run again (nothing was written):",
        problems.len()
    );
    for problem in problems.iter().take(PROBLEMS_SHOWN) {
        text.push_str("\n  ");
        text.push_str(problem);
    }
    if problems.len() > PROBLEMS_SHOWN {
        text.push_str(&format!(
            "\n  ... and {} more",
            problems.len() - PROBLEMS_SHOWN
        ));
    }
    if let Some(hint) = hint {
        text.push_str("\nhint: ");
        text.push_str(hint);
    }
    text
}
