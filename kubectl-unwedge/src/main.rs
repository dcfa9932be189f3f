//! `kubectl unwedge`: see and steer GpuWedge incidents (docs/design.md §4).
//!
//! Reads GpuWedges, RecoveryPolicies and Events; writes the human-verb annotations
//! (`unwedge.io/approve|retry|abandon` with `unwedge.io/by`) on wedges, and `spec.paused` (with
//! `unwedge.io/resume` for a tripped circuit breaker) on policies. The operator does the rest.

mod cluster;
mod complete;
mod describe;
mod error;
mod list;
mod present;
mod verbs;

use std::fmt::Debug;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand};
use jiff::Timestamp;
use kube::api::ListParams;
use kube::{Api, Client, ResourceExt};
use unwedge_crds::{GpuWedge, RecoveryPolicy};

use cluster::{
    client, get_policy, get_wedge, list_wedges, patch_policy, policy_target, wedge_events,
    wedge_target, whoami, write_verb,
};
use complete::Offer;
use describe::describe;
use error::CliError;
use list::{dynamic_wedges, emit, encode, list_data, list_table};
use present::{DataFormat, ListFormat};
use verbs::Verb;

/// See and steer GPU wedge incidents handled by unwedge.
#[derive(Parser, Debug)]
#[command(name = "kubectl unwedge", version, about)]
struct Cli {
    /// Path to the kubeconfig file (default: $KUBECONFIG, ~/.kube/config, or in-cluster).
    #[arg(long, global = true)]
    kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use (default: the current context).
    #[arg(long, global = true)]
    context: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Wedges across the fleet, with their queue position when they wait for budget.
    List {
        /// Output format: table, wide (adds policy, card, attempts, approval), json or yaml
        /// (a List of the GpuWedges as the API returned them).
        #[arg(short, long, value_enum, default_value_t)]
        output: ListFormat,
        /// After the list, print every change (a row, or the object) until interrupted.
        #[arg(short, long)]
        watch: bool,
    },
    /// A wedge and the timeline of its incident.
    Describe {
        /// The GpuWedge.
        name: String,
        /// Print the GpuWedge itself as json or yaml instead.
        #[arg(short, long, value_enum)]
        output: Option<DataFormat>,
    },
    /// Approve a wedge that waits for a human (AwaitingApproval or NeedsAttention).
    Approve {
        /// The GpuWedge.
        name: String,
        /// The method to carry out (default: the rung the operator planned).
        #[arg(long)]
        method: Option<String>,
    },
    /// Start a new attempt from the current rung (NeedsAttention, or after a failed attempt).
    Retry {
        /// The GpuWedge.
        name: String,
    },
    /// Hand the incident to a human: unwedge lets go, the node stays cordoned.
    Abandon {
        /// The GpuWedge.
        name: String,
        /// Why (recorded on the wedge).
        #[arg(long)]
        reason: Option<String>,
    },
    /// Per RecoveryPolicy: nodes selected, allowed, in use, reboots, devices, queued.
    Budget {
        /// Print the rows as json or yaml instead.
        #[arg(short, long, value_enum)]
        output: Option<DataFormat>,
    },
    /// Pause a RecoveryPolicy: no automatic action on its nodes; wedges are still recorded.
    Pause {
        /// The RecoveryPolicy.
        policy: String,
    },
    /// Resume a RecoveryPolicy: unpause it, and close its circuit breaker if it tripped.
    Resume {
        /// The RecoveryPolicy.
        policy: String,
    },
    /// Print a shell completion script for kubectl-unwedge, or (--kubectl) the helper that
    /// completes `kubectl unwedge`.
    Completion {
        /// The shell.
        #[arg(value_enum, required_unless_present = "kubectl")]
        shell: Option<clap_complete::Shell>,
        /// Print the `kubectl_complete-unwedge` script that lets `kubectl unwedge <TAB>`
        /// complete (kubectl 1.26 and later) instead.
        #[arg(long, conflicts_with = "shell")]
        kubectl: bool,
    },
}

pub(crate) const WEDGES: &str = "gpuwedges.unwedge.io";
pub(crate) const POLICIES: &str = "recoverypolicies.unwedge.io";

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some(complete::HIDDEN_VERB) {
        complete_words(&args[1..]).await;
        return ExitCode::SUCCESS;
    }
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<(), CliError> {
    if let Command::Completion { shell, kubectl } = cli.command {
        match shell {
            Some(shell) if !kubectl => completion_script(shell, &mut std::io::stdout())
                .map_err(|e| CliError::Encode(e.to_string()))?,
            _ => print!("{}", complete::KUBECTL_COMPLETE_SCRIPT),
        }
        return Ok(());
    }
    let client = client(cli.kubeconfig.as_ref(), cli.context.as_deref()).await?;
    let wedges: Api<GpuWedge> = Api::all(client.clone());
    let policies: Api<RecoveryPolicy> = Api::all(client.clone());
    match cli.command {
        Command::List { output, watch } => match output.data() {
            Some(format) => list_data(&client, format, watch).await?,
            None => list_table(&wedges, output == ListFormat::Wide, watch).await?,
        },
        Command::Describe {
            name,
            output: Some(format),
        } => {
            let (api, ar) = dynamic_wedges(&client);
            let w = api
                .get(&name)
                .await
                .map_err(|e| wedge_target("get", Some(&name)).err(e))?;
            print!("{}", encode(&present::shown(w, &ar), format)?);
        }
        Command::Describe { name, output: None } => {
            let w = get_wedge(&wedges, &name).await?;
            let (events, note) = wedge_events(&client, &name).await;
            print!("{}", describe(&w));
            println!("\nTimeline:");
            print!(
                "{}",
                present::render_timeline(&present::timeline(&w, &events))
            );
            if let Some(note) = note {
                println!("(events not shown: {note})");
            }
        }
        Command::Approve { name, method } => {
            let w = get_wedge(&wedges, &name).await?;
            let policy = match present::policy_of(&w) {
                Some(p) if method.is_some() => Some(get_policy(&policies, p).await?),
                _ => None,
            };
            verbs::check_approve(&w, method.as_deref(), policy.as_ref())?;
            let by = whoami(&client).await?;
            let m = method.clone().unwrap_or_default();
            write_verb(&wedges, &name, &Verb::Approve(m), &by).await?;
            match method {
                Some(m) => println!("gpuwedge/{name} approved with method {m} by {by}"),
                None => {
                    println!("gpuwedge/{name} approved (the operator's planned method) by {by}")
                }
            }
            println!(
                "The operator records the approval in status.approval; follow it with `kubectl unwedge describe {name}`."
            );
        }
        Command::Retry { name } => {
            let w = get_wedge(&wedges, &name).await?;
            verbs::check_retry(&w)?;
            let by = whoami(&client).await?;
            let token = Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string();
            write_verb(&wedges, &name, &Verb::Retry(token), &by).await?;
            println!(
                "gpuwedge/{name}: retry requested by {by}; the operator starts a new attempt from the current rung."
            );
        }
        Command::Abandon { name, reason } => {
            let w = get_wedge(&wedges, &name).await?;
            verbs::check_abandon(&w)?;
            let by = whoami(&client).await?;
            let reason = reason.unwrap_or_else(|| "abandoned with kubectl unwedge".into());
            write_verb(&wedges, &name, &Verb::Abandon(reason), &by).await?;
            println!("{}", verbs::abandon_meaning(&name, &w.spec.node_name));
            println!("gpuwedge/{name} abandoned by {by}.");
        }
        Command::Budget { output } => {
            let ps = policies
                .list(&ListParams::default())
                .await
                .map_err(|e| policy_target("list", None).err(e))?
                .items;
            if let Some(format) = output {
                let ws = list_wedges(&wedges).await?;
                print!("{}", encode(&present::budget_rows(&ps, &ws), format)?);
                return Ok(());
            }
            if ps.is_empty() {
                println!(
                    "No RecoveryPolicies: the operator admits nothing until one exists (with the chart, the operator applies a default at start)."
                );
                return Ok(());
            }
            let ws = list_wedges(&wedges).await?;
            let rows = present::budget_rows(&ps, &ws);
            print!(
                "{}",
                present::render_table(&present::BUDGET_HEADERS, &present::budget_cells(&rows))
            );
        }
        Command::Pause { policy } => {
            let p = get_policy(&policies, &policy).await?;
            if !p.spec.paused {
                patch_policy(&policies, &policy, &verbs::paused_patch(true)).await?;
            }
            println!("{}", verbs::pause_meaning(&policy, p.spec.paused));
        }
        Command::Resume { policy } => {
            let p = get_policy(&policies, &policy).await?;
            let plan = verbs::resume_plan(&p, Timestamp::now());
            if plan.was_paused || plan.token.is_some() {
                patch_policy(&policies, &policy, &plan.patch).await?;
            }
            println!("{}", verbs::resume_meaning(&policy, &plan));
        }
        Command::Completion { .. } => unreachable!("handled before connecting"),
    }
    Ok(())
}

/// The completion script of `shell` for the `kubectl-unwedge` executable (its functions are
/// named after it, not after the `kubectl unwedge` of the help text).
///
/// clap_complete's bash script completes nothing after a subcommand when the executable's name
/// has a hyphen (clap-rs/clap#6421: its case labels and its state disagree on escaping `-`), so
/// the bash script is generated for `kubectl_unwedge` and registered for `kubectl-unwedge`.
fn completion_script(shell: clap_complete::Shell, out: &mut dyn Write) -> std::io::Result<()> {
    const BIN: &str = "kubectl-unwedge";
    let name = if shell == clap_complete::Shell::Bash {
        "kubectl_unwedge"
    } else {
        BIN
    };
    let mut cmd = Cli::command().name(name).display_name(name);
    let mut buf = Vec::new();
    clap_complete::generate(shell, &mut cmd, name, &mut buf);
    let mut script = String::from_utf8_lossy(&buf).into_owned();
    if name != BIN {
        script = script.replace(
            &format!(" -o default {name}\n"),
            &format!(" -o default {BIN}\n"),
        );
    }
    out.write_all(script.as_bytes())
}

/// `__complete ARGS... WORD`: the candidates for WORD in Cobra's protocol (complete.rs). Names
/// come from the cluster (`--kubeconfig` / `--context` as typed, else the defaults) within a
/// few seconds; when it cannot be reached, nothing is offered.
async fn complete_words(args: &[String]) {
    let c = complete::complete(&Cli::command(), args);
    let word = args.last().map(String::as_str).unwrap_or("");
    let names = |client: Client, wedges: bool| async move {
        if wedges {
            let api: Api<GpuWedge> = Api::all(client);
            let list = api.list(&ListParams::default()).await.ok()?.items;
            Some(
                list.iter()
                    .map(|w| {
                        let about = format!("{:?} on {}", present::phase_of(w), w.spec.node_name);
                        (w.name_any(), about)
                    })
                    .collect::<Vec<_>>(),
            )
        } else {
            let api: Api<RecoveryPolicy> = Api::all(client);
            let list = api.list(&ListParams::default()).await.ok()?.items;
            Some(
                list.iter()
                    .map(|p| {
                        let about = if p.spec.paused { "paused" } else { "" };
                        (p.name_any(), about.to_string())
                    })
                    .collect(),
            )
        }
    };
    let text = match c.offer {
        Offer::Words(words) => complete::render(&words, word, complete::NO_FILES),
        Offer::Files => format!(":{}\n", complete::FILES),
        offer @ (Offer::Wedges | Offer::Policies) => {
            let kubeconfig = c.kubeconfig.map(PathBuf::from);
            let found = async {
                let client = client(kubeconfig.as_ref(), c.context.as_deref())
                    .await
                    .ok()?;
                names(client, offer == Offer::Wedges).await
            };
            let words = tokio::time::timeout(Duration::from_secs(5), found)
                .await
                .ok()
                .flatten()
                .unwrap_or_default();
            complete::render(&words, word, complete::NO_FILES)
        }
    };
    emit(&text);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Command, clap::Error> {
        Cli::try_parse_from(std::iter::once("kubectl-unwedge").chain(args.iter().copied()))
            .map(|c| c.command)
    }

    #[test]
    fn output_formats_parse_per_verb() {
        assert!(matches!(
            parse(&["list"]).unwrap(),
            Command::List {
                output: ListFormat::Table,
                watch: false
            }
        ));
        assert!(matches!(
            parse(&["list", "-o", "wide", "-w"]).unwrap(),
            Command::List {
                output: ListFormat::Wide,
                watch: true
            }
        ));
        assert!(matches!(
            parse(&["list", "--output=json", "--watch"]).unwrap(),
            Command::List {
                output: ListFormat::Json,
                watch: true
            }
        ));
        assert!(parse(&["list", "-o", "xml"]).is_err());
        assert!(matches!(
            parse(&["describe", "w", "-o", "yaml"]).unwrap(),
            Command::Describe {
                output: Some(DataFormat::Yaml),
                ..
            }
        ));
        assert!(
            parse(&["describe", "w", "-o", "wide"]).is_err(),
            "describe prints text or data"
        );
        assert!(matches!(
            parse(&["budget", "-o", "json"]).unwrap(),
            Command::Budget {
                output: Some(DataFormat::Json)
            }
        ));
        assert!(matches!(
            parse(&["budget"]).unwrap(),
            Command::Budget { output: None }
        ));
    }

    #[test]
    fn policy_verbs_and_completion_parse() {
        assert!(
            matches!(parse(&["pause", "gpu"]).unwrap(), Command::Pause { policy } if policy == "gpu")
        );
        assert!(
            matches!(parse(&["resume", "gpu"]).unwrap(), Command::Resume { policy } if policy == "gpu")
        );
        assert!(parse(&["pause"]).is_err(), "a policy is required");
        assert!(matches!(
            parse(&["completion", "zsh"]).unwrap(),
            Command::Completion {
                shell: Some(clap_complete::Shell::Zsh),
                kubectl: false
            }
        ));
        assert!(matches!(
            parse(&["completion", "--kubectl"]).unwrap(),
            Command::Completion {
                shell: None,
                kubectl: true
            }
        ));
        assert!(parse(&["completion"]).is_err(), "a shell or --kubectl");
        assert!(parse(&["completion", "bash", "--kubectl"]).is_err());
    }

    #[test]
    fn the_completion_scripts_complete_kubectl_unwedge() {
        let mut buf = Vec::new();
        completion_script(clap_complete::Shell::Bash, &mut buf).unwrap();
        let script = String::from_utf8(buf).unwrap();
        assert!(
            script.contains("-o bashdefault -o default kubectl-unwedge\n"),
            "{script}"
        );
        assert!(!script.contains("default kubectl_unwedge"), "{script}");
        for verb in ["pause", "resume", "completion", "--watch"] {
            assert!(script.contains(verb), "{verb} missing");
        }
        let c = complete::complete(&Cli::command(), &["".into()]);
        let Offer::Words(verbs) = c.offer else {
            panic!("{c:?}")
        };
        let verbs: Vec<&str> = verbs.iter().map(|(v, _)| v.as_str()).collect();
        assert_eq!(
            verbs,
            [
                "list",
                "describe",
                "approve",
                "retry",
                "abandon",
                "budget",
                "pause",
                "resume",
                "completion"
            ]
        );
        let c = complete::complete(&Cli::command(), &["approve".into(), "wa".into()]);
        assert_eq!(c.offer, Offer::Wedges);
    }
}
