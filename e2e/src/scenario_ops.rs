//! What scenarios do to the cluster and check beyond the fleet itself: PodDisruptionBudgets
//! that hold a drain, Events, human verbs written as the admin, watching a held wedge, and
//! waiting for a state with the scenario's report on failure ([`Scenario::eventually`]).

use std::future::Future;
use std::time::Duration;

use k8s_openapi::api::core::v1::Event;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use unwedge_crds::gpuwedge::{GpuWedge, Phase};

use crate::cluster::ControlPlane;
use crate::fleet::{Bins, Scenario};
use crate::wait::{self, Check};
use crate::wedge_view::{Outcome, phase};

/// How long a held wedge is watched to prove nothing moves.
pub const HOLD: Duration = Duration::from_secs(8);
/// How long a scenario waits for a wedge to reach a phase.
pub const PHASE_WAIT: Duration = Duration::from_secs(120);

/// What every scenario file starts from: the binaries under test and a local control plane
/// with the CRDs applied. Panics (failing the test) when either cannot be had.
pub async fn binaries_and_plane() -> (Bins, ControlPlane) {
    let bins = tokio::task::spawn_blocking(Bins::build)
        .await
        .expect("the build task")
        .expect("build the binaries under test");
    let cp = ControlPlane::start()
        .await
        .expect("start the local control plane");
    cp.apply_crds().await.expect("apply the CRDs");
    (bins, cp)
}

impl Scenario {
    /// A PodDisruptionBudget in `ns` that allows no disruption of the pods named `apps` (the
    /// harness labels every pod `app=<its name>`); waits until the disruption controller has
    /// counted them healthy, so an eviction is refused from then on.
    pub async fn pdb_blocking(&self, ns: &str, name: &str, apps: &[&str]) -> Outcome {
        let api: Api<PodDisruptionBudget> = Api::namespaced(self.fleet.client(), ns);
        let pdb: PodDisruptionBudget = serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": ns},
            "spec": {
                "minAvailable": apps.len(),
                "selector": {"matchExpressions": [{"key": "app", "operator": "In", "values": apps}]}
            }
        }))
        .map_err(self.ctx("PodDisruptionBudget"))?;
        api.create(&PostParams::default(), &pdb)
            .await
            .map_err(self.ctx(&format!("create PodDisruptionBudget {name}")))?;
        let want = apps.len() as i32;
        self.eventually(
            &format!(
                "PodDisruptionBudget {name} to count {want} healthy pods and allow 0 disruptions"
            ),
            Duration::from_secs(30),
            || async {
                let p = api.get(name).await.map_err(self.ctx("get PDB"))?;
                let st = p.status.unwrap_or_default();
                Ok(
                    if st.current_healthy == Some(want) && st.disruptions_allowed == Some(0) {
                        Check::Done(())
                    } else {
                        Check::Seen(format!(
                            "{:?} healthy, {:?} disruptions allowed",
                            st.current_healthy, st.disruptions_allowed
                        ))
                    },
                )
            },
        )
        .await
    }

    /// Relaxes a PodDisruptionBudget made by [`pdb_blocking`] to allow every disruption.
    pub async fn pdb_relax(&self, ns: &str, name: &str) -> Outcome {
        Api::<PodDisruptionBudget>::namespaced(self.fleet.client(), ns)
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"minAvailable": 0}})),
            )
            .await
            .map(|_| ())
            .map_err(self.ctx(&format!("relax PodDisruptionBudget {name}")))
    }

    /// Asks `check` every [`wait::EVERY`] until it reports the awaited state (returned), for
    /// at most `timeout`. The failure names `what` and the last state seen, with the scenario's
    /// report ([`Scenario::fail`]); an error of the check (a failure message already) ends the
    /// wait at once.
    pub async fn eventually<T, F, Fut>(
        &self,
        what: &str,
        timeout: Duration,
        check: F,
    ) -> Result<T, String>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<Check<T>, String>>,
    {
        wait::poll(what, timeout, wait::EVERY, check)
            .await
            .map_err(|t| self.fail(&t.to_string()))?
    }

    /// Waits up to 60 s for the first Event with `reason` about the object `name`; `why` says
    /// what the Event shows (e.g. "a PDB holds the drain").
    pub async fn wait_event(&self, name: &str, reason: &str, why: &str) -> Outcome {
        self.eventually(
            &format!("an Event {reason} about {name} ({why})"),
            Duration::from_secs(60),
            || async {
                Ok(match self.events(name, reason).await?.len() {
                    0 => Check::Seen("none".to_string()),
                    _ => Check::Done(()),
                })
            },
        )
        .await
    }

    /// Waits up to `timeout` until the agent of `node` has asked its host to reboot; `why`
    /// says why it should.
    pub async fn wait_reboot_request(&self, node: &str, why: &str, timeout: Duration) -> Outcome {
        self.eventually(
            &format!("the agent of {node} to request a reboot ({why})"),
            timeout,
            || async {
                Ok(match self.fleet.sim(node).reboot_requests() {
                    0 => Check::Seen("no reboot request".to_string()),
                    _ => Check::Done(()),
                })
            },
        )
        .await
    }

    /// Events with `reason` about the object named `name`, in any namespace.
    pub async fn events(&self, name: &str, reason: &str) -> Result<Vec<Event>, String> {
        Api::<Event>::all(self.fleet.client())
            .list(
                &ListParams::default()
                    .fields(&format!("involvedObject.name={name},reason={reason}")),
            )
            .await
            .map(|l| l.items)
            .map_err(self.ctx("list events"))
    }

    /// The only wedge of `node` (an error names how many there were).
    pub fn only_wedge(&self, node: &str) -> Result<GpuWedge, String> {
        let ws = self.rec.wedges_of(node);
        match ws.as_slice() {
            [w] => Ok(w.clone()),
            _ => Err(self.fail(&format!(
                "node {node}: expected exactly one GpuWedge, seen {}",
                ws.len()
            ))),
        }
    }

    /// Watches `node`'s wedge for [`HOLD`] and fails if it leaves `held`, if a device of the node
    /// was written, or if an approval appeared.
    pub async fn stays(&self, node: &str, held: Phase, why: &str) -> Outcome {
        let until = tokio::time::Instant::now() + HOLD;
        while tokio::time::Instant::now() < until {
            let w = self.only_wedge(node)?;
            let approved = w.status.as_ref().and_then(|s| s.approval.clone());
            if phase(&w) != Some(held) || approved.is_some() {
                return Err(self.fail(&format!(
                    "{why}: node {node} expected to stay {held:?} with no approval, seen {:?}, approval {approved:?}",
                    phase(&w)
                )));
            }
            if !self.fleet.sim(node).sysfs.journal().is_empty() {
                return Err(self.fail(&format!(
                    "{why}: the device of {node} was written while held"
                )));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        Ok(())
    }

    /// The username the API server sees for the scenario's (admin) client: the `by` of a human verb.
    pub async fn admin_name(&self) -> Result<String, String> {
        ControlPlane::whoami(&self.fleet.client())
            .await
            .map_err(self.ctx("SelfSubjectReview"))?
            .status
            .and_then(|s| s.user_info)
            .and_then(|u| u.username)
            .ok_or_else(|| self.fail("SelfSubjectReview has no username"))
    }

    /// Writes human-verb annotations on a wedge as the admin, with `unwedge.io/by` = the admin.
    pub async fn human_verb(&self, wedge: &str, verb: &str, value: &str) -> Outcome {
        let by = self.admin_name().await?;
        Api::<GpuWedge>::all(self.fleet.client())
            .patch(
                wedge,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"annotations": {
                    format!("unwedge.io/{verb}"): value, "unwedge.io/by": by}}})),
            )
            .await
            .map(|_| ())
            .map_err(self.ctx(&format!("annotate {wedge} with unwedge.io/{verb}")))
    }

    /// Fails unless `node`'s device `bdf` saw exactly `n` unbinds and `n` binds.
    pub fn rebinds(&self, node: &str, bdf: &str, n: usize) -> Outcome {
        let s = &self.fleet.sim(node).sysfs;
        let seen = (s.count("unbind", bdf), s.count("bind", bdf));
        if seen != (n, n) {
            return Err(self.fail(&format!(
                "sysfs journal of {node}: expected {n} unbind and {n} bind of {bdf}, seen {seen:?}: {:?}",
                s.journal()
            )));
        }
        Ok(())
    }

    /// Injects `WEDGED=<methods>` for `bdf` through the kernel into `node`'s namespace.
    pub async fn inject(&self, bins: &Bins, node: &str, bdf: &str, methods: &str) -> Outcome {
        self.fleet
            .sim(node)
            .inject(bins, bdf, methods, &[])
            .await
            .map_err(self.ctx(&format!("inject {methods} for {node} {bdf}")))
    }

    /// Waits up to [`PHASE_WAIT`] until a wedge of `node` is in `phase`; returns it.
    pub async fn wait_phase(&self, node: &str, phase: Phase) -> Result<GpuWedge, String> {
        self.rec
            .wait_phase(node, phase, PHASE_WAIT)
            .await
            .map_err(|x| self.fail(&x))
    }

    /// Fails unless `node` is schedulable now (after unwedge let go of it).
    pub fn uncordoned(&self, node: &str) -> Outcome {
        match self.rec.node_cordoned(node) {
            Some(false) => Ok(()),
            seen => Err(self.fail(&format!(
                "node {node} expected uncordoned after recovery, seen cordoned {seen:?}"
            ))),
        }
    }
}
