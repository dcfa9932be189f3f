//! `--verify-command`: a program that must exit 0 for a recovery to count as verified.
//!
//! It runs as an argv, split on whitespace, never through a shell: the agent image is built
//! FROM scratch and has no `sh`. So no quotes, pipes, redirections or `$VARIABLES`; the device
//! is passed in the environment instead (`UNWEDGE_PCI_ADDRESS`, `UNWEDGE_CARD`,
//! `UNWEDGE_DRIVER`). An image that does ship a shell may still say `/bin/sh -c script-file`.
//! `--reboot-command` follows the same rule ([`split_argv`]).

use std::io;
use std::process::Stdio;

use thiserror::Error;

/// Why the verify command did not pass.
#[derive(Debug, Error)]
pub enum VerifyCommandError {
    /// The flag holds only whitespace.
    #[error(
        "--verify-command is empty: give a program and its arguments, e.g. \"/usr/bin/xpu-smi discovery\", or leave the flag unset"
    )]
    Empty,
    /// The program does not exist (in the agent's image, or on its PATH).
    #[error(
        "verify command program {program:?} not found: it runs without a shell, so name a program present in the agent's image (an absolute path is safest); quotes, pipes and variables are not interpreted"
    )]
    NotFound {
        /// The program named.
        program: String,
    },
    /// The program exists but could not be started.
    #[error("cannot run the verify command {program:?}: {source}")]
    Spawn {
        /// The program named.
        program: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The program ran and did not exit 0.
    #[error("verify command {argv:?} exited with {status}: {stderr}")]
    Exited {
        /// The argv run.
        argv: Vec<String>,
        /// How it ended.
        status: std::process::ExitStatus,
        /// Its standard error, trimmed.
        stderr: String,
    },
}

/// How `--verify-command` and `--reboot-command` become an argv: split on whitespace, nothing
/// else (no quotes, escapes, pipes or variables). Empty when `cmd` is blank.
pub fn split_argv(cmd: &str) -> Vec<String> {
    cmd.split_whitespace().map(str::to_string).collect()
}

/// A parsed `--verify-command`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyCommand {
    argv: Vec<String>,
}

impl VerifyCommand {
    /// Splits `cmd` on whitespace: the first word is the program, the rest its arguments.
    pub fn parse(cmd: &str) -> Result<Self, VerifyCommandError> {
        let argv = split_argv(cmd);
        if argv.is_empty() {
            return Err(VerifyCommandError::Empty);
        }
        Ok(Self { argv })
    }

    /// The program and its arguments.
    pub fn argv(&self) -> &[String] {
        &self.argv
    }

    /// Runs the command with `env` added to the agent's environment; `Ok` when it exits 0.
    pub async fn run(&self, env: &[(&str, &str)]) -> Result<(), VerifyCommandError> {
        let program = &self.argv[0];
        let out = tokio::process::Command::new(program)
            .args(&self.argv[1..])
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output()
            .await
            .map_err(|source| match source.kind() {
                io::ErrorKind::NotFound => VerifyCommandError::NotFound {
                    program: program.clone(),
                },
                _ => VerifyCommandError::Spawn {
                    program: program.clone(),
                    source,
                },
            })?;
        if out.status.success() {
            return Ok(());
        }
        Err(VerifyCommandError::Exited {
            argv: self.argv.clone(),
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_on_whitespace_without_shell_rules() {
        let c = VerifyCommand::parse("  /usr/bin/test  \"x\" =  x ").unwrap();
        assert_eq!(c.argv(), ["/usr/bin/test", "\"x\"", "=", "x"]);
        assert!(matches!(
            VerifyCommand::parse(" \t "),
            Err(VerifyCommandError::Empty)
        ));
    }

    #[tokio::test]
    async fn runs_as_argv_not_through_a_shell() {
        let env = [("UNWEDGE_PCI_ADDRESS", "0000:03:00.0")];
        VerifyCommand::parse("test x = x")
            .unwrap()
            .run(&env)
            .await
            .unwrap();
        // A shell would strip the quotes and the test would pass; as argv `"x"` is not `x`.
        let quoted = VerifyCommand::parse("test \"x\" = x")
            .unwrap()
            .run(&env)
            .await;
        assert!(
            matches!(quoted, Err(VerifyCommandError::Exited { .. })),
            "{quoted:?}"
        );
        // `;` is an argument of `false`, not a command separator.
        let chained = VerifyCommand::parse("false ; true")
            .unwrap()
            .run(&env)
            .await;
        assert!(
            matches!(chained, Err(VerifyCommandError::Exited { .. })),
            "{chained:?}"
        );
    }

    #[tokio::test]
    async fn a_missing_program_says_so() {
        let e = VerifyCommand::parse("/nonexistent/unwedge-verify --all")
            .unwrap()
            .run(&[])
            .await
            .unwrap_err();
        assert!(matches!(e, VerifyCommandError::NotFound { .. }), "{e:?}");
        assert!(e.to_string().contains("without a shell"), "{e}");
    }

    #[tokio::test]
    async fn the_device_is_in_the_environment() {
        let ok = VerifyCommand::parse("printenv UNWEDGE_PCI_ADDRESS")
            .unwrap()
            .run(&[("UNWEDGE_PCI_ADDRESS", "0000:03:00.0")])
            .await;
        assert!(ok.is_ok(), "{ok:?}");
        let missing = VerifyCommand::parse("printenv UNWEDGE_NOT_SET")
            .unwrap()
            .run(&[])
            .await;
        assert!(missing.is_err());
    }
}
