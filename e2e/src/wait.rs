//! Waiting for the cluster (or a simulated node) to reach a state, in one place: [`poll`] asks
//! a check until it reports the state or a deadline passes, and the failure names what was
//! awaited and the last state the check saw; [`object`] waits for one named object through
//! kube's `await_condition` (a watch, not polling). The recorder's own waits
//! ([`crate::recorder::Recorder::wait_wedges`]) wake on its watch events instead.

use std::fmt::Debug;
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use kube::runtime::wait::await_condition;
use kube::{Api, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// How often [`until`] and [`until_through_errors`] ask.
pub const EVERY: Duration = Duration::from_millis(250);

/// What a check found.
#[derive(Debug, Clone, PartialEq)]
pub enum Check<T> {
    /// The awaited state, with what the waiter gets back.
    Done(T),
    /// Not yet: what was seen instead, for the failure message.
    Seen(String),
}

impl Check<()> {
    /// Done unless `contrary` says what was seen instead (for checks that only describe a
    /// miss).
    pub fn unless(contrary: Option<String>) -> Self {
        contrary.map_or(Check::Done(()), Check::Seen)
    }
}

impl<T> From<Option<T>> for Check<T> {
    fn from(o: Option<T>) -> Self {
        o.map_or_else(|| Check::Seen("not yet".to_string()), Check::Done)
    }
}

/// A wait that ended at its deadline.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("timed out after {timeout:?} waiting for {what}; last seen: {seen}")]
pub struct TimedOut {
    /// What was awaited.
    pub what: String,
    /// How long.
    pub timeout: Duration,
    /// What the last check saw.
    pub seen: String,
}

/// Asks `check` every `every` until it returns [`Check::Done`]; an error of the check ends the
/// wait at once (inner `Err`). The check is asked once more at the deadline, so a slow check
/// is never cut short of its last answer.
pub async fn poll<T, E, F, Fut>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut check: F,
) -> Result<Result<T, E>, TimedOut>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Check<T>, E>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let seen = match check().await {
            Ok(Check::Done(v)) => return Ok(Ok(v)),
            Ok(Check::Seen(seen)) => seen,
            Err(e) => return Ok(Err(e)),
        };
        if tokio::time::Instant::now() >= deadline {
            return Err(TimedOut {
                what: what.to_string(),
                timeout,
                seen,
            });
        }
        tokio::time::sleep(every).await;
    }
}

/// [`poll`] every [`EVERY`] for checks that answer a [`Check`], or `Some` when done; an error
/// ends the wait.
pub async fn until<T, C, F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<T>
where
    C: Into<Check<T>>,
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<C>>,
{
    poll(what, timeout, EVERY, || {
        let answer = check();
        async move { answer.await.map(Into::into) }
    })
    .await?
}

/// [`until`] where an error is one more state seen (an API server restarting, a component not
/// answering yet): the wait goes on, and the last error is in the failure message.
pub async fn until_through_errors<T, F, Fut>(
    what: &str,
    timeout: Duration,
    mut check: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    poll(what, timeout, EVERY, || {
        let answer = check();
        async move {
            Ok::<_, anyhow::Error>(match answer.await {
                Ok(o) => Check::from(o),
                Err(e) => Check::Seen(format!("{e:#}")),
            })
        }
    })
    .await?
}

/// Waits until the object `name` of `api` satisfies `ok`, the awaited `state` in words (kube's
/// `await_condition`: a watch of that one object); returns it. The failure names the object and
/// the state, and shows the last version seen (its status, or the whole object when it has
/// none), or that it never existed.
pub async fn object<K>(
    api: &Api<K>,
    name: &str,
    state: &str,
    timeout: Duration,
    ok: impl Fn(&K) -> bool,
) -> anyhow::Result<K>
where
    K: Resource + Clone + Debug + Send + Serialize + DeserializeOwned + 'static,
    K::DynamicType: Default,
{
    let last: Mutex<Option<String>> = Mutex::new(None);
    let cond = |o: Option<&K>| {
        *last.lock().unwrap_or_else(|e| e.into_inner()) = o.map(shown);
        o.is_some_and(&ok)
    };
    let kind = K::kind(&K::DynamicType::default()).to_string();
    let what = format!("{kind} {name}");
    let waited = tokio::time::timeout(timeout, await_condition(api.clone(), name, cond)).await;
    match waited {
        Ok(Ok(Some(k))) => Ok(k),
        Ok(Ok(None)) => unreachable!("a condition that holds has an object"),
        Ok(Err(e)) => Err(anyhow::anyhow!("watching {what}: {e}")),
        Err(_) => Err(TimedOut {
            what: format!("{what} {state}"),
            timeout,
            seen: last
                .into_inner()
                .unwrap_or_else(|e| e.into_inner())
                .unwrap_or_else(|| "no such object".to_string()),
        }
        .into()),
    }
}

/// An object's status as JSON, or the whole object (without managed fields) when it has none.
fn shown<K: Serialize>(k: &K) -> String {
    let mut v = serde_json::to_value(k).unwrap_or_default();
    if let Some(status) = v.get("status").filter(|s| !s.is_null()) {
        return format!("status {status}");
    }
    if let Some(meta) = v.get_mut("metadata").and_then(|m| m.as_object_mut()) {
        meta.remove("managedFields");
    }
    v.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_wait_ends_when_done_and_says_what_it_saw_when_not() {
        let mut n = 0;
        let every = Duration::from_millis(10);
        let got = poll("three", Duration::from_secs(5), every, || {
            n += 1;
            let c = if n == 3 {
                Check::Done(n)
            } else {
                Check::Seen(format!("{n}"))
            };
            async move { Ok::<_, String>(c) }
        })
        .await;
        assert_eq!(got, Ok(Ok(3)));

        let timed_out = poll("never", Duration::from_millis(100), every, || async {
            Ok::<Check<()>, String>(Check::Seen("still red".into()))
        })
        .await
        .unwrap_err();
        assert_eq!(
            timed_out.to_string(),
            "timed out after 100ms waiting for never; last seen: still red"
        );

        let failed = poll("broken", Duration::from_secs(1), every, || async {
            Err::<Check<()>, _>("no API".to_string())
        })
        .await;
        assert_eq!(failed, Ok(Err("no API".to_string())));
    }

    #[tokio::test]
    async fn errors_end_until_but_not_until_through_errors() {
        let e = until("x", Duration::from_secs(1), || async {
            Err::<Option<()>, _>(anyhow::anyhow!("refused"))
        })
        .await
        .unwrap_err();
        assert_eq!(e.to_string(), "refused");
        let e = until_through_errors("x", Duration::from_millis(300), || async {
            Err::<Option<()>, _>(anyhow::anyhow!("refused"))
        })
        .await
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "timed out after 300ms waiting for x; last seen: refused"
        );
    }
}
