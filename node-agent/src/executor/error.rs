//! What can go wrong in the executor, in three kinds with three fates: an [`ExecutorError`]
//! leaves a step unfinished (logged, counted in `unwedge_agent_api_errors_total`, retried on
//! the next resync); an [`ActError`] ends the attempt `Failed` with "<method> failed: <error>";
//! a [`VerifyError`] ends it `Failed` with "<what was done> but <error>". The last two are the
//! words a human reads in `status.attempts[].message`.

use std::io;
use std::time::Duration;

use tokio::task::JoinError;
use unwedge_crds::Method;

use crate::host::HostError;
use crate::verify_command::VerifyCommandError;

/// Why a step of an attempt was not completed; the next resync takes it up again.
#[derive(Debug, thiserror::Error)]
pub enum ExecutorError {
    /// The journal could not be written, so nothing is done that it would not record.
    #[error("cannot write the attempt journal (refusing to act): {0}")]
    Journal(#[source] io::Error),
    /// The wedge was deleted while its attempt was being reported.
    #[error("GpuWedge {0} is gone")]
    Gone(String),
    /// The API did not take the attempt's entry, after retries.
    #[error("cannot report attempt on {name}: {source}")]
    Report {
        /// The wedge.
        name: String,
        /// The last refusal.
        #[source]
        source: kube::Error,
    },
    /// Reading the wedge or writing its agent message failed.
    #[error(transparent)]
    Api(#[from] kube::Error),
    /// The fd gate's scan of `/proc` panicked.
    #[error("fd gate scan panicked: {0}")]
    GateScan(#[source] JoinError),
}

/// Why the host action of an attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum ActError {
    /// `rebind` and `bus-reset` need the driver read from sysfs; none was bound.
    #[error("no driver bound to {bdf}: {method} needs one")]
    NoDriver {
        /// The device.
        bdf: String,
        /// The method.
        method: String,
    },
    /// A sysfs write or the reboot command failed.
    #[error(transparent)]
    Host(#[from] HostError),
    /// The blocking task running the host action panicked.
    #[error("host action panicked: {0}")]
    Panicked(#[source] JoinError),
    /// A method the agent has no host action for.
    #[error("agent does not know how to carry out {0}")]
    UnknownMethod(Method),
    /// The `Started` report before a reboot was not taken, so the host is not rebooted.
    #[error(transparent)]
    Report(#[from] ExecutorError),
}

/// Why a device did not pass verification after the host action.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The driver or the card node did not come back in time.
    #[error(
        "the device did not come back within {timeout:?}: driver {driver:?} (want {}), card {card:?}",
        .expected.as_deref().unwrap_or("any")
    )]
    NotBack {
        /// `--reappear-timeout`.
        timeout: Duration,
        /// The driver bound at the deadline.
        driver: Option<String>,
        /// The driver expected (the one read before acting); `None`: any.
        expected: Option<String>,
        /// The card node at the deadline.
        card: Option<String>,
    },
    /// A WEDGED uevent came for the device within the settle window.
    #[error("{bdf} wedged again within the settle window of {settle:?}")]
    WedgedAgain {
        /// The device.
        bdf: String,
        /// `--settle`.
        settle: Duration,
    },
    /// `--verify-command` could not be parsed or run, or did not exit 0.
    #[error(transparent)]
    Command(#[from] VerifyCommandError),
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The texts a human reads in `status.attempts[].message` after "<method> failed: " or
    /// "<what was done> but ", word for word as before the errors were typed.
    #[test]
    fn attempt_messages_keep_their_words() {
        let no_driver = ActError::NoDriver {
            bdf: "0000:03:00.0".into(),
            method: "rebind".into(),
        };
        assert_eq!(
            no_driver.to_string(),
            "no driver bound to 0000:03:00.0: rebind needs one"
        );
        assert_eq!(
            ActError::UnknownMethod(Method::from("cold-reset")).to_string(),
            "agent does not know how to carry out cold-reset"
        );
        assert_eq!(
            ActError::from(HostError::Command("reboot: exit status 1".into())).to_string(),
            "reboot: exit status 1"
        );
        assert_eq!(
            ActError::from(ExecutorError::Gone("w".into())).to_string(),
            "GpuWedge w is gone"
        );
        let not_back = |driver: Option<&str>, expected: Option<&str>, card: Option<&str>| {
            VerifyError::NotBack {
                timeout: Duration::from_secs(30),
                driver: driver.map(str::to_string),
                expected: expected.map(str::to_string),
                card: card.map(str::to_string),
            }
            .to_string()
        };
        assert_eq!(
            not_back(None, None, None),
            "the device did not come back within 30s: driver None (want any), card None"
        );
        assert_eq!(
            not_back(Some("i915"), Some("xe"), Some("card1")),
            "the device did not come back within 30s: driver Some(\"i915\") (want xe), card Some(\"card1\")"
        );
        let again = VerifyError::WedgedAgain {
            bdf: "0000:03:00.0".into(),
            settle: Duration::from_millis(1500),
        };
        assert_eq!(
            again.to_string(),
            "0000:03:00.0 wedged again within the settle window of 1.5s"
        );
        assert_eq!(
            ExecutorError::Journal(io::Error::other("disk full")).to_string(),
            "cannot write the attempt journal (refusing to act): disk full"
        );
    }
}
