//! Every line an approved attempt logs carries the attempt's span (wedge, method, attempt). In a
//! binary of its own: tracing caches per call site whether anyone listens, and a test on another
//! thread of the same process (with no subscriber) can settle that before this test's
//! thread-local subscriber exists, which left the span disabled now and then.

#[path = "executor/fakes.rs"]
mod fakes;

use std::sync::Arc;

use fakes::{FakeSysfs, MemStore, approved, executor};

/// A log sink the test can read back.
#[derive(Clone, Default)]
struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn every_line_an_attempt_logs_names_its_wedge_method_and_attempt() {
    let captured = Captured::default();
    let sink = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || sink.clone())
        .with_ansi(false)
        .finish();
    let _default = tracing::subscriber::set_default(subscriber);

    let fake = FakeSysfs::new();
    let state = tempfile::tempdir().unwrap();
    let w = approved("rebind", 1);
    let store = MemStore::with(&w);
    executor(&fake, store, state.path(), "false", true)
        .process(&w)
        .await;

    let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("unwedge_agent::executor"))
        .collect();
    assert!(
        lines.iter().any(|l| l.contains("attempt finished")),
        "the dry run logs its end:\n{text}"
    );
    for line in lines {
        assert!(
            line.contains("attempt{wedge=node-a-0000-03-00-0-7 method=rebind attempt=1}:"),
            "a line outside the attempt span: {line}"
        );
    }
}
