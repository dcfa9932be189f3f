//! The agent's append-only JSON-lines files (the attempt journal, the detection record): one
//! reader for both.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::Path;

use serde::Serialize;
use serde::de::DeserializeOwned;

/// The records of `file` (opened from `path`), one JSON value a line. Blank lines are skipped;
/// unreadable ones (a torn last line after a crash) are logged as `what` and skipped. Read
/// errors are returned.
pub fn read<T: DeserializeOwned>(file: File, path: &Path, what: &str) -> io::Result<Vec<T>> {
    let mut records = Vec::new();
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str(&line) {
            Ok(r) => records.push(r),
            Err(e) => {
                tracing::warn!(file = %path.display(), line = i + 1, error = %e, "skipping unreadable {what}")
            }
        }
    }
    Ok(records)
}

/// Appends `rec` to `path` as one JSON line (creating the file) and fsyncs it before returning.
pub fn append<T: Serialize>(path: &Path, rec: &T) -> io::Result<()> {
    let mut line = serde_json::to_vec(rec).map_err(io::Error::other)?;
    line.push(b'\n');
    let mut f = OpenOptions::new().create(true).append(true).open(path)?;
    f.write_all(&line)?;
    f.sync_all()
}
