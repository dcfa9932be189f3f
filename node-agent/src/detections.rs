//! The agent's durable memory of the wedges it detected and the API accepted: what lets the
//! executor act only on a GpuWedge this agent itself reported (issue #22).
//!
//! The outbox ([`crate::outbox`]) holds a detection until the API accepts it and then deletes
//! the entry, so it cannot answer "did I detect this?" for long. Before the entry is deleted
//! the replayer appends one line to `<state-dir>/detections.jsonl` (fsync'd): the wedge's name,
//! node, PCI address and boot id, and the driver sysfs showed bound at detection. Record first, delete second: at every moment a detection is
//! in the outbox or in this file, so a restart forgets nothing and an approval can never race
//! ahead of the record. The file keeps the newest [`KEPT`] detections: it is rewritten
//! (temp file, fsync, rename) whenever it holds twice that many. An incident older than the
//! last [`KEPT`] detections of the node is no longer recognised and its approvals are refused,
//! which is the safe side. A line that cannot be parsed (torn by a crash) is skipped.

use std::collections::VecDeque;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

/// How many reported detections are remembered.
pub const KEPT: usize = 512;

/// One detection the API accepted, as the GpuWedge that holds it names it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct DetectionRecord {
    /// The GpuWedge's name.
    pub wedge: String,
    /// The node (`spec.nodeName`).
    pub node: String,
    /// The PCI address (`spec.device.pciAddress`).
    pub pci_address: String,
    /// The boot id at detection (`spec.bootId`).
    pub boot_id: String,
    /// The driver sysfs showed bound at detection (empty: none), for a device a failed
    /// attempt left unbound.
    #[serde(default)]
    pub driver: String,
    /// When the API accepted it.
    pub at: Timestamp,
}

impl DetectionRecord {
    /// Whether this record is the detection of a GpuWedge with these spec fields.
    pub fn is(&self, wedge: &str, node: &str, pci_address: &str, boot_id: &str) -> bool {
        self.wedge == wedge
            && self.node == node
            && self.pci_address == pci_address
            && self.boot_id == boot_id
    }
}

/// `<state-dir>/detections.jsonl`, with its records in memory (newest last).
#[derive(Debug, Clone)]
pub struct Detections {
    path: PathBuf,
    kept: usize,
    records: Arc<Mutex<VecDeque<DetectionRecord>>>,
}

impl Detections {
    /// Loads `<state_dir>/detections.jsonl` (an absent file is an empty record), keeping the
    /// newest [`KEPT`].
    pub fn open(state_dir: &Path) -> io::Result<Self> {
        Self::open_keeping(state_dir, KEPT)
    }

    /// [`Detections::open`], keeping the newest `kept` (tests use a small number).
    pub fn open_keeping(state_dir: &Path, kept: usize) -> io::Result<Self> {
        fs::create_dir_all(state_dir)?;
        let path = state_dir.join("detections.jsonl");
        let mut records: VecDeque<DetectionRecord> = match File::open(&path) {
            Ok(f) => crate::jsonl::read(f, &path, "detection record")?.into(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => VecDeque::new(),
            Err(e) => return Err(e),
        };
        while records.len() > kept {
            records.pop_front();
        }
        Ok(Self {
            path,
            kept,
            records: Arc::new(Mutex::new(records)),
        })
    }

    /// Remembers `rec` (in memory even when the file cannot be written; the write's error is
    /// returned for the caller to log). A record already held is not written twice.
    pub fn record(&self, rec: DetectionRecord) -> io::Result<()> {
        let mut records = self.records.lock().expect("detections poisoned");
        if records
            .iter()
            .any(|r| r.is(&rec.wedge, &rec.node, &rec.pci_address, &rec.boot_id))
        {
            return Ok(());
        }
        records.push_back(rec.clone());
        while records.len() > self.kept {
            records.pop_front();
        }
        self.append(&rec)?;
        if self.lines()? > 2 * self.kept {
            self.rewrite(&records)?;
        }
        Ok(())
    }

    /// Whether a GpuWedge with these spec fields is a detection this agent reported.
    pub fn holds(&self, wedge: &str, node: &str, pci_address: &str, boot_id: &str) -> bool {
        self.find(wedge, node, pci_address, boot_id).is_some()
    }

    /// The record of the GpuWedge with these spec fields, if this agent reported it.
    pub fn find(
        &self,
        wedge: &str,
        node: &str,
        pci_address: &str,
        boot_id: &str,
    ) -> Option<DetectionRecord> {
        self.records
            .lock()
            .expect("detections poisoned")
            .iter()
            .rev()
            .find(|r| r.is(wedge, node, pci_address, boot_id))
            .cloned()
    }

    /// How many detections are remembered.
    pub fn len(&self) -> usize {
        self.records.lock().expect("detections poisoned").len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn append(&self, rec: &DetectionRecord) -> io::Result<()> {
        crate::jsonl::append(&self.path, rec)
    }

    fn lines(&self) -> io::Result<usize> {
        Ok(BufReader::new(File::open(&self.path)?).lines().count())
    }

    fn rewrite(&self, records: &VecDeque<DetectionRecord>) -> io::Result<()> {
        let tmp = self.path.with_extension("jsonl.tmp");
        {
            let mut f = File::create(&tmp)?;
            for r in records {
                let mut line = serde_json::to_vec(r).map_err(io::Error::other)?;
                line.push(b'\n');
                f.write_all(&line)?;
            }
            f.sync_all()?;
        }
        fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(n: usize) -> DetectionRecord {
        DetectionRecord {
            wedge: format!("node-a-0000-03-00-0-{n}"),
            node: "node-a".into(),
            pci_address: "0000:03:00.0".into(),
            boot_id: "boot-1".into(),
            driver: "xe".into(),
            at: Timestamp::UNIX_EPOCH,
        }
    }

    #[test]
    fn a_restart_remembers_and_every_field_must_match() {
        let t = tempfile::tempdir().unwrap();
        Detections::open(t.path()).unwrap().record(rec(1)).unwrap();
        let d = Detections::open(t.path()).unwrap();
        let r = rec(1);
        assert!(d.holds(&r.wedge, "node-a", "0000:03:00.0", "boot-1"));
        assert!(!d.holds(&r.wedge, "node-b", "0000:03:00.0", "boot-1"));
        assert!(!d.holds(&r.wedge, "node-a", "0000:04:00.0", "boot-1"));
        assert!(!d.holds(&r.wedge, "node-a", "0000:03:00.0", "boot-2"));
        assert!(!d.holds("node-a-0000-03-00-0-2", "node-a", "0000:03:00.0", "boot-1"));
    }

    #[test]
    fn the_file_stays_bounded_and_keeps_the_newest() {
        let t = tempfile::tempdir().unwrap();
        let kept = 8;
        let d = Detections::open_keeping(t.path(), kept).unwrap();
        for n in 0..(3 * kept) {
            d.record(rec(n)).unwrap();
        }
        d.record(rec(3 * kept - 1)).unwrap();
        let lines = fs::read_to_string(t.path().join("detections.jsonl"))
            .unwrap()
            .lines()
            .count();
        assert!(lines <= 2 * kept, "{lines} lines");
        let reopened = Detections::open_keeping(t.path(), kept).unwrap();
        assert_eq!(reopened.len(), kept);
        let newest = rec(3 * kept - 1);
        assert!(reopened.holds(&newest.wedge, "node-a", "0000:03:00.0", "boot-1"));
        let oldest = rec(0);
        assert!(!reopened.holds(&oldest.wedge, "node-a", "0000:03:00.0", "boot-1"));
    }

    #[test]
    fn a_torn_line_is_skipped() {
        let t = tempfile::tempdir().unwrap();
        Detections::open(t.path()).unwrap().record(rec(1)).unwrap();
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(t.path().join("detections.jsonl"))
            .unwrap();
        f.write_all(b"{\"wedge\":\"x").unwrap();
        assert_eq!(Detections::open(t.path()).unwrap().len(), 1);
    }
}
