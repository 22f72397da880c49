//! Why a package was refused.

use std::path::PathBuf;

/// Everything that can make a model package unusable, each with the file it concerns.
#[derive(Debug, thiserror::Error)]
pub enum PackageError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// `flow.json` is not valid JSON for the manifest schema.
    #[error("{path}: not a valid manifest: {source}")]
    Json {
        /// The manifest file.
        path: PathBuf,
        /// The parse error, with line and column.
        #[source]
        source: serde_json::Error,
    },
    /// A graph's bytes do not hash to the manifest's sha256.
    #[error("{path}: sha256 is {actual} but flow.json says {expected}; the file was changed or corrupted after export")]
    Checksum {
        /// The graph file.
        path: PathBuf,
        /// The manifest's checksum.
        expected: String,
        /// The file's checksum.
        actual: String,
    },
    /// The manifest contradicts itself or the graph files.
    #[error("{path}: {message}")]
    Invalid {
        /// The file concerned.
        path: PathBuf,
        /// What is wrong, as a sentence.
        message: String,
    },
}

impl PackageError {
    pub(crate) fn invalid(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        PackageError::Invalid {
            path: path.into(),
            message: message.into(),
        }
    }
}
