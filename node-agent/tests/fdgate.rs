//! The fd gate sees a real process that holds a device node, and clears once it exits.

use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use unwedge_agent::fdgate::holders;

struct Holder(Child);

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn gate_blocks_while_a_real_process_holds_the_card_and_clears_after_it_exits() {
    let t = tempfile::tempdir().unwrap();
    let dev = t.path().join("dev");
    fs::create_dir_all(dev.join("dri")).unwrap();
    fs::write(dev.join("dri/card0"), "").unwrap();
    fs::write(dev.join("dri/renderD128"), "").unwrap();
    let nodes = vec!["card0".to_string(), "renderD128".to_string()];
    let proc_root = Path::new("/proc");

    assert!(
        holders(proc_root, &dev, &nodes, &[]).is_empty(),
        "nobody holds it yet"
    );

    let mut child = Holder(
        Command::new("sleep")
            .arg("30")
            .stdin(fs::File::open(dev.join("dri/renderD128")).unwrap())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let pid = child.0.id();
    let seen = holders(proc_root, &dev, &nodes, &[]);
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].pid, pid);
    assert_eq!(seen[0].comm, "sleep");
    assert_eq!(
        seen[0].path,
        dev.join("dri/renderD128").display().to_string()
    );
    assert!(seen[0].to_string().contains(&format!("pid {pid} (sleep)")));

    child.0.kill().unwrap();
    child.0.wait().unwrap();
    assert!(
        holders(proc_root, &dev, &nodes, &[]).is_empty(),
        "clear after the holder exited"
    );
}

#[test]
fn the_agent_itself_is_never_a_holder() {
    let t = tempfile::tempdir().unwrap();
    let dev = t.path().join("dev");
    fs::create_dir_all(dev.join("dri")).unwrap();
    fs::write(dev.join("dri/card0"), "").unwrap();
    let _own = fs::File::open(dev.join("dri/card0")).unwrap();
    assert!(holders(Path::new("/proc"), &dev, &["card0".to_string()], &[]).is_empty());
}
