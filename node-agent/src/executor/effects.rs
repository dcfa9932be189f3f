//! The executor's effects on the host: the method itself (unbind/bind, PCI reset, reboot), then
//! the verification that the device came back (driver, card node, the settle window, the
//! verify command, the device plugin). Every write goes through [`HostActions`].

use std::time::{Duration, Instant};

use jiff::Timestamp;
use kube::ResourceExt;
use unwedge_crds::{AttemptOutcome, GpuWedge, Method};

use super::Executor;
use super::error::{ActError, VerifyError};
use super::journal::wedge_key;
use super::store::WedgeStore;
use crate::host::{HostActions, HostError};
use crate::verify_command::VerifyCommand;

/// A successful verification: what was seen, and whether the device plugin advertises the
/// device again.
pub(super) struct Verified {
    pub(super) message: String,
    pub(super) advertised: Option<bool>,
}

impl<H: HostActions + 'static, S: WedgeStore> Executor<H, S> {
    /// Runs the method on the host with the cleared `driver`. `Ok(None)`: a reboot is under
    /// way (nothing to report yet).
    pub(super) async fn act(
        &self,
        wedge: &GpuWedge,
        method: &str,
        driver: Option<&str>,
        attempt: u32,
        started_at: Timestamp,
        boot_id: &str,
    ) -> Result<Option<String>, ActError> {
        let bdf = wedge.spec.device.pci_address.clone();
        let host = self.host.clone();
        let needs_driver = || {
            driver
                .map(str::to_string)
                .ok_or_else(|| ActError::NoDriver {
                    bdf: bdf.clone(),
                    method: method.to_string(),
                })
        };
        match Method::from(method) {
            Method::Rebind => {
                let driver = needs_driver()?;
                let (b, d) = (bdf.clone(), driver.clone());
                blocking(move || {
                    if host.driver_of(&b).is_some() {
                        unbind_confirmed(host.as_ref(), &b, &d)?;
                    }
                    host.bind(&b, &d)
                })
                .await?;
                Ok(Some(format!("rebind: unbound and bound {bdf} to {driver}")))
            }
            Method::BusReset => {
                let driver = needs_driver()?;
                let (b, d) = (bdf.clone(), driver.clone());
                let done = blocking(move || {
                    if host.driver_of(&b).is_some() {
                        unbind_confirmed(host.as_ref(), &b, &d)?;
                    }
                    match host.pci_reset(&b) {
                        Ok(used) => {
                            host.bind(&b, &d)?;
                            Ok(format!("bus-reset: {b} reset by the kernel's {used} reset_method, bound to {d}"))
                        }
                        Err(e) => {
                            host.remove(&b)?;
                            host.rescan()?;
                            Ok(format!("bus-reset: reset of {b} failed ({e}); removed and rescanned the bus"))
                        }
                    }
                })
                .await?;
                Ok(Some(done))
            }
            Method::Reboot => {
                self.report(
                    &wedge.name_any(),
                    Self::entry(
                        attempt,
                        method,
                        AttemptOutcome::Started,
                        started_at,
                        boot_id,
                        format!("rebooting the host (boot id {boot_id})"),
                        None,
                    ),
                )
                .await?;
                blocking(move || host.reboot()).await?;
                self.reboots_requested
                    .lock()
                    .expect("reboot requests poisoned")
                    .insert((wedge_key(wedge), attempt));
                tracing::warn!("reboot requested; waiting for the host to go down");
                Ok(None)
            }
            other => Err(ActError::UnknownMethod(other)),
        }
    }

    /// Driver bound again (the `expected` one read from sysfs before acting; any driver when
    /// none was bound), card node back (found by PCI address), quiet for the settle window,
    /// verify command exits 0.
    pub(super) async fn verify(
        &self,
        wedge: &GpuWedge,
        expected: Option<&str>,
        acted_at: Instant,
    ) -> Result<Verified, VerifyError> {
        let bdf = wedge.spec.device.pci_address.clone();
        let deadline = Instant::now() + self.cfg.reappear_timeout;
        let (driver, card) = loop {
            let (d, c) = (self.host.driver_of(&bdf), self.host.card_of(&bdf));
            let back = match (&d, expected) {
                (Some(d), Some(want)) => d == want,
                (Some(_), None) => true,
                (None, _) => false,
            };
            if let (true, Some(d), Some(c)) = (back, &d, &c) {
                break (d.clone(), c.clone());
            }
            if Instant::now() >= deadline {
                return Err(VerifyError::NotBack {
                    timeout: self.cfg.reappear_timeout,
                    driver: d,
                    expected: expected.map(str::to_string),
                    card: c,
                });
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        tokio::time::sleep(self.cfg.settle).await;
        if self.clock.wedged_since(&bdf, acted_at) {
            return Err(VerifyError::WedgedAgain {
                bdf,
                settle: self.cfg.settle,
            });
        }
        if let Some(cmd) = &self.cfg.verify_command {
            VerifyCommand::parse(cmd)?
                .run(&[
                    ("UNWEDGE_PCI_ADDRESS", bdf.as_str()),
                    ("UNWEDGE_CARD", card.as_str()),
                    ("UNWEDGE_DRIVER", driver.as_str()),
                ])
                .await?;
        }
        let was = wedge.spec.device.card.clone().unwrap_or_default();
        let advertised = self.wait_advertised(&bdf).await;
        let plugin = match advertised {
            Some(true) => "; its device plugin advertises it again",
            Some(false) => "; its device plugin does not advertise it again",
            None => "",
        };
        Ok(Verified {
            message: format!(
                "verified: {driver} bound, {card} present (was {was}), quiet for {:?}{plugin}",
                self.cfg.settle
            ),
            advertised,
        })
    }

    /// Asks until the device plugin advertises `bdf` again, or
    /// [`super::ExecutorConfig::reappear_timeout`] passes (`Some(false)`); `None` when the
    /// question cannot be answered here.
    async fn wait_advertised(&self, bdf: &str) -> Option<bool> {
        let check = self.cfg.advertised.as_ref()?;
        let deadline = Instant::now() + self.cfg.reappear_timeout;
        loop {
            match (check.0)(bdf.to_string()).await {
                Some(false) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(500)).await
                }
                answer => return answer,
            }
        }
    }
}

/// How long an unbind may take to show in sysfs before the attempt fails.
const UNBIND_TIMEOUT: Duration = Duration::from_secs(10);

/// Unbinds and waits until sysfs shows the device without a driver, so the bind that follows
/// never races a driver still going away (a driver whose remove failed or hangs fails the
/// attempt here with a clear message instead of a bind that silently did nothing).
fn unbind_confirmed<H: HostActions + ?Sized>(
    host: &H,
    bdf: &str,
    driver: &str,
) -> Result<(), HostError> {
    host.unbind(bdf, driver)?;
    let deadline = Instant::now() + UNBIND_TIMEOUT;
    while host.driver_of(bdf).is_some() {
        if Instant::now() >= deadline {
            return Err(HostError::Command(format!(
                "{bdf} still bound to {driver} {UNBIND_TIMEOUT:?} after the unbind write"
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Runs a host action on the blocking pool (sysfs writes can block for as long as a driver's
/// remove takes).
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, HostError> + Send + 'static,
) -> Result<T, ActError> {
    Ok(tokio::task::spawn_blocking(f)
        .await
        .map_err(ActError::Panicked)??)
}
