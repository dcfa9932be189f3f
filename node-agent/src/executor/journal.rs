//! The local attempt journal, `<state-dir>/attempts.jsonl`: one fsync'd line per stage of an
//! attempt, written before the status and before the host is touched, so "at most once" holds
//! across restarts even when a status patch was lost (docs/design.md §4 invariant 2).

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

use jiff::Timestamp;
use kube::ResourceExt;
use serde::{Deserialize, Serialize};
use unwedge_crds::{AttemptOutcome, ContainerRestart, GpuWedge};

/// The uid the journal keys a wedge by (its name when the object has no uid, e.g. in tests).
pub fn wedge_key(w: &GpuWedge) -> String {
    w.uid().unwrap_or_else(|| w.name_any())
}

/// How far an attempt got, as recorded in the journal.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// The attempt id is spent; the device has not been touched yet.
    Started,
    /// The fd gate was clear and the host action is about to run.
    Acting,
    /// The attempt ended with `result`.
    Finished,
}

/// One line of `<state-dir>/attempts.jsonl`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct JournalRecord {
    /// The wedge's name.
    pub wedge: String,
    /// The wedge's uid (a recreated wedge of the same name is another incident).
    pub uid: String,
    /// Attempt id.
    pub attempt: u32,
    /// Method.
    pub method: String,
    /// Stage reached.
    pub stage: Stage,
    /// When.
    pub at: Timestamp,
    /// Boot id at that moment.
    pub boot_id: String,
    /// Final result (stage Finished).
    #[serde(default)]
    pub result: Option<AttemptOutcome>,
    /// Final message (stage Finished).
    #[serde(default)]
    pub message: Option<String>,
    /// Whether the device plugin advertised the device again (stage Finished, after success).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertised: Option<bool>,
    /// The driver read from sysfs before acting (stage Acting; none for a device without one),
    /// which verification expects bound again, also after a reboot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver: Option<String>,
    /// Method `restart`, stage Finished: each container's in-place restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restarts: Option<Vec<ContainerRestart>>,
}

impl JournalRecord {
    /// The record of `stage` of attempt `attempt` of `wedge` with `method`, now, without an
    /// outcome or a driver.
    pub fn new(wedge: &GpuWedge, attempt: u32, method: &str, stage: Stage, boot_id: &str) -> Self {
        Self {
            wedge: wedge.name_any(),
            uid: wedge_key(wedge),
            attempt,
            method: method.to_string(),
            stage,
            at: Timestamp::now(),
            boot_id: boot_id.to_string(),
            result: None,
            message: None,
            advertised: None,
            driver: None,
            restarts: None,
        }
    }
}

/// What the journal knows about one attempt.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct AttemptLog {
    /// The Started record.
    pub started: Option<JournalRecord>,
    /// The Acting record.
    pub acting: Option<JournalRecord>,
    /// The Finished record.
    pub finished: Option<JournalRecord>,
}

/// The append-only attempt journal.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    records: Vec<JournalRecord>,
}

impl Journal {
    /// Loads `<state_dir>/attempts.jsonl` (creating the dir). Unparseable lines (a torn last
    /// line after a crash) are logged and skipped.
    pub fn open(state_dir: &Path) -> io::Result<Self> {
        fs::create_dir_all(state_dir)?;
        let path = state_dir.join("attempts.jsonl");
        let records = match File::open(&path) {
            Ok(f) => crate::jsonl::read(f, &path, "attempt journal line")?,
            Err(_) => Vec::new(),
        };
        Ok(Self { path, records })
    }

    /// Appends a record and fsyncs it before returning.
    pub fn append(&mut self, rec: JournalRecord) -> io::Result<()> {
        crate::jsonl::append(&self.path, &rec)?;
        self.records.push(rec);
        Ok(())
    }

    /// The driver read from sysfs before the latest attempt on the wedge with `uid` that had
    /// one (see [`JournalRecord::driver`]).
    pub fn driver_read(&self, uid: &str) -> Option<String> {
        self.records
            .iter()
            .rev()
            .filter(|r| r.uid == uid && r.stage == Stage::Acting)
            .find_map(|r| r.driver.clone())
    }

    /// What is recorded for attempt `attempt` of the wedge with `uid`.
    pub fn of(&self, uid: &str, attempt: u32) -> AttemptLog {
        let mut log = AttemptLog::default();
        for r in self
            .records
            .iter()
            .filter(|r| r.uid == uid && r.attempt == attempt)
        {
            let slot = match r.stage {
                Stage::Started => &mut log.started,
                Stage::Acting => &mut log.acting,
                Stage::Finished => &mut log.finished,
            };
            *slot = Some(r.clone());
        }
        log
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub(in crate::executor) fn rec(stage: Stage, method: &str, boot: &str) -> JournalRecord {
        JournalRecord {
            wedge: "node-a-0000-03-00-0-7".into(),
            uid: "uid-1".into(),
            attempt: 1,
            method: method.into(),
            stage,
            at: Timestamp::UNIX_EPOCH,
            boot_id: boot.into(),
            result: (stage == Stage::Finished).then_some(AttemptOutcome::Succeeded),
            advertised: None,
            message: None,
            driver: None,
            restarts: None,
        }
    }

    pub(in crate::executor) fn journal(recs: Vec<JournalRecord>) -> (tempfile::TempDir, Journal) {
        let t = tempfile::tempdir().unwrap();
        let mut j = Journal::open(t.path()).unwrap();
        for r in recs {
            j.append(r).unwrap();
        }
        let j = Journal::open(t.path()).unwrap();
        (t, j)
    }

    #[test]
    fn a_torn_journal_line_is_skipped() {
        let t = tempfile::tempdir().unwrap();
        let mut j = Journal::open(t.path()).unwrap();
        j.append(rec(Stage::Started, "rebind", "b1")).unwrap();
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(t.path().join("attempts.jsonl"))
            .unwrap();
        std::io::Write::write_all(&mut f, b"{\"wedge\":\"x\",\"ui").unwrap();
        let j = Journal::open(t.path()).unwrap();
        assert!(j.of("uid-1", 1).started.is_some());
    }
}
