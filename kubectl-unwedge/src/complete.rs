//! Completion for `kubectl unwedge <TAB>`: kubectl (1.26 and later) completes a plugin's
//! arguments by running `kubectl_complete-unwedge ARGS... WORD` from `PATH` and reading Cobra's
//! protocol back: one candidate a line (`value<TAB>description`), then `:<directive>`.
//! `kubectl-unwedge __complete ARGS... WORD` answers in that protocol; `completion --kubectl`
//! prints the two-line `kubectl_complete-unwedge` script that calls it.
//!
//! Pure: [`complete`] says what to offer, the caller lists wedge or policy names when asked.

use clap::Command;

/// The hidden first argument that asks for completions instead of running a command.
pub const HIDDEN_VERB: &str = "__complete";

/// Cobra's `ShellCompDirectiveDefault`: the shell may complete file names.
pub const FILES: u32 = 0;
/// Cobra's `ShellCompDirectiveNoFileComp`: offer only the candidates.
pub const NO_FILES: u32 = 4;

/// What to offer for the word being completed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Offer {
    /// These words, with their descriptions.
    Words(Vec<(String, String)>),
    /// The GpuWedges' names.
    Wedges,
    /// The RecoveryPolicies' names.
    Policies,
    /// File names (the shell's own completion).
    Files,
}

/// What [`complete`] found in the words typed so far.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Completion {
    /// What to offer.
    pub offer: Offer,
    /// `--kubeconfig` as typed, for listing names from the right cluster.
    pub kubeconfig: Option<String>,
    /// `--context` as typed.
    pub context: Option<String>,
}

/// Subcommands whose first argument is a GpuWedge.
const WEDGE_ARG: [&str; 4] = ["describe", "approve", "retry", "abandon"];
/// Subcommands whose first argument is a RecoveryPolicy.
const POLICY_ARG: [&str; 2] = ["pause", "resume"];

/// What to offer for the last of `args` (the words after `kubectl unwedge`; the last is the
/// word being completed, empty at a fresh position), from the command tree `cmd`.
pub fn complete(cmd: &Command, args: &[String]) -> Completion {
    let mut root = cmd.clone();
    root.build();
    let (word, typed) = args
        .split_last()
        .map_or(("", &[][..]), |(w, t)| (w.as_str(), t));
    let mut cur = &root;
    let mut positionals = 0usize;
    let mut kubeconfig = None;
    let mut context = None;
    let mut pending: Option<&clap::Arg> = None;
    for w in typed {
        if let Some(arg) = pending.take() {
            match arg.get_id().as_str() {
                "kubeconfig" => kubeconfig = Some(w.clone()),
                "context" => context = Some(w.clone()),
                _ => {}
            }
            continue;
        }
        if let Some(flag) = w.strip_prefix("--") {
            let (name, value) = match flag.split_once('=') {
                Some((n, v)) => (n, Some(v)),
                None => (flag, None),
            };
            let arg = cur.get_arguments().find(|a| a.get_long() == Some(name));
            match (arg, value) {
                (Some(a), None) if takes_value(a) => pending = Some(a),
                (Some(a), Some(v)) => match a.get_id().as_str() {
                    "kubeconfig" => kubeconfig = Some(v.to_string()),
                    "context" => context = Some(v.to_string()),
                    _ => {}
                },
                _ => {}
            }
        } else if let Some(short) = w.strip_prefix('-').filter(|s| !s.is_empty()) {
            let c = short.chars().next().unwrap_or_default();
            let arg = cur.get_arguments().find(|a| a.get_short() == Some(c));
            if let Some(a) = arg.filter(|a| takes_value(a) && short.len() == 1) {
                pending = Some(a);
            }
        } else if let Some(sub) = cur.find_subcommand(w) {
            cur = sub;
            positionals = 0;
        } else {
            positionals += 1;
        }
    }
    let offer = if let Some(arg) = pending {
        if arg.get_id() == "kubeconfig" {
            Offer::Files
        } else {
            Offer::Words(values(arg))
        }
    } else if word.starts_with('-') {
        let flags = cur
            .get_arguments()
            .filter(|a| !a.is_hide_set())
            .filter_map(|a| a.get_long().map(|l| (format!("--{l}"), help(a.get_help()))))
            .collect();
        Offer::Words(flags)
    } else if cur.has_subcommands() {
        Offer::Words(
            cur.get_subcommands()
                .filter(|s| !s.is_hide_set() && s.get_name() != "help")
                .map(|s| (s.get_name().to_string(), help(s.get_about())))
                .collect(),
        )
    } else if positionals == 0 && WEDGE_ARG.contains(&cur.get_name()) {
        Offer::Wedges
    } else if positionals == 0 && POLICY_ARG.contains(&cur.get_name()) {
        Offer::Policies
    } else {
        match cur.get_positionals().nth(positionals) {
            Some(a) => Offer::Words(values(a)),
            None => Offer::Words(Vec::new()),
        }
    };
    Completion {
        offer,
        kubeconfig,
        context,
    }
}

fn takes_value(a: &clap::Arg) -> bool {
    a.get_num_args().is_some_and(|n| n.takes_values())
}

fn values(a: &clap::Arg) -> Vec<(String, String)> {
    a.get_possible_values()
        .iter()
        .filter(|v| !v.is_hide_set())
        .map(|v| (v.get_name().to_string(), help(v.get_help())))
        .collect()
}

fn help(s: Option<&clap::builder::StyledStr>) -> String {
    s.map(|s| s.to_string()).unwrap_or_default()
}

/// The answer in Cobra's protocol: the candidates that start with `word`, one a line with a tab
/// before a description (first line of it), then `:<directive>`.
pub fn render(candidates: &[(String, String)], word: &str, directive: u32) -> String {
    let mut out = String::new();
    for (value, about) in candidates.iter().filter(|(v, _)| v.starts_with(word)) {
        out.push_str(value);
        if let Some(first) = about.lines().next().filter(|l| !l.is_empty()) {
            out.push('\t');
            out.push_str(first);
        }
        out.push('\n');
    }
    out.push_str(&format!(":{directive}\n"));
    out
}

/// The `kubectl_complete-unwedge` executable: kubectl runs it to complete `kubectl unwedge`.
pub const KUBECTL_COMPLETE_SCRIPT: &str = "#!/bin/sh\n\
# kubectl (1.26 and later) runs this to complete `kubectl unwedge ...`; put it on PATH, executable.\n\
exec kubectl-unwedge __complete \"$@\"\n";

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Arg, ArgAction};

    /// A command tree shaped like the plugin's.
    fn cli() -> Command {
        let output = Arg::new("output")
            .short('o')
            .long("output")
            .value_parser(["table", "wide", "json", "yaml"]);
        Command::new("kubectl-unwedge")
            .arg(Arg::new("kubeconfig").long("kubeconfig").global(true))
            .arg(Arg::new("context").long("context").global(true))
            .subcommand(
                Command::new("list")
                    .about("Wedges across the fleet")
                    .arg(output)
                    .arg(
                        Arg::new("watch")
                            .short('w')
                            .long("watch")
                            .action(ArgAction::SetTrue),
                    ),
            )
            .subcommand(Command::new("describe").arg(Arg::new("name")))
            .subcommand(Command::new("resume").arg(Arg::new("policy")))
            .subcommand(
                Command::new("completion").arg(Arg::new("shell").value_parser(["bash", "zsh"])),
            )
            .subcommand(Command::new("secret").hide(true))
    }

    fn offer(args: &[&str]) -> Completion {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        complete(&cli(), &args)
    }

    fn words(c: Completion) -> Vec<String> {
        match c.offer {
            Offer::Words(w) => w.into_iter().map(|(v, _)| v).collect(),
            other => panic!("words expected, got {other:?}"),
        }
    }

    #[test]
    fn offers_verbs_then_flags_then_values() {
        assert_eq!(
            words(offer(&[""])),
            ["list", "describe", "resume", "completion"],
            "no hidden verb, no help"
        );
        let flags = words(offer(&["list", "--"]));
        for f in ["--output", "--watch", "--kubeconfig", "--context"] {
            assert!(flags.contains(&f.to_string()), "{flags:?}");
        }
        assert_eq!(
            words(offer(&["list", "-o", ""])),
            ["table", "wide", "json", "yaml"]
        );
        assert_eq!(
            words(offer(&["list", "--output", "w"])).len(),
            4,
            "render filters"
        );
        assert_eq!(words(offer(&["completion", ""])), ["bash", "zsh"]);
        assert!(words(offer(&["completion", "bash", ""])).is_empty());
    }

    #[test]
    fn offers_names_from_the_cluster_typed() {
        let c = offer(&["--kubeconfig", "/k", "describe", "w"]);
        assert_eq!(c.offer, Offer::Wedges);
        assert_eq!(c.kubeconfig.as_deref(), Some("/k"));
        let c = offer(&["resume", "--context=prod", ""]);
        assert_eq!(c.offer, Offer::Policies);
        assert_eq!(c.context.as_deref(), Some("prod"));
        assert_eq!(
            offer(&["describe", "w1", ""]).offer,
            Offer::Words(Vec::new())
        );
        assert_eq!(offer(&["list", "--kubeconfig", ""]).offer, Offer::Files);
    }

    #[test]
    fn renders_cobras_protocol() {
        let c = vec![
            (
                "wa".to_string(),
                "AwaitingApproval on node-a\nmore".to_string(),
            ),
            ("wb".to_string(), String::new()),
            ("x".to_string(), String::new()),
        ];
        assert_eq!(
            render(&c, "w", NO_FILES),
            "wa\tAwaitingApproval on node-a\nwb\n:4\n"
        );
        assert_eq!(render(&[], "", FILES), ":0\n");
    }
}
