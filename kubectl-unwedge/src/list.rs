//! `list`: the table or `-o json|yaml`, and with `--watch` one line or document per change.

use std::fmt::Debug;
use std::io::Write;

use futures::StreamExt;
use jiff::Timestamp;
use kube::api::{ApiResource, DynamicObject, ListParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use unwedge_crds::GpuWedge;

use crate::cluster::{list_wedges, wedge_target};
use crate::error::CliError;
use crate::present::{self, Change, Columns, DataFormat, Watch};

/// `list` as a table (`wide`: more columns), then, with `watch`, one row per change.
pub(crate) async fn list_table(
    api: &Api<GpuWedge>,
    wide: bool,
    watch: bool,
) -> Result<(), CliError> {
    let list = list_wedges(api).await?;
    let headers = present::list_headers(wide);
    if list.is_empty() && !watch {
        println!("No GpuWedges: no GPU has wedged (or none was reported).");
        return Ok(());
    }
    let rows = present::rows(&list, Timestamp::now(), wide);
    let mut cols = Columns::fit(headers, &rows);
    let mut text = format!("{}\n", cols.line(headers));
    for row in &rows {
        text.push_str(&cols.line(row));
        text.push('\n');
    }
    if !emit(&text) || !watch {
        return Ok(());
    }
    watch_changes(api.clone(), list, |state, change| {
        let (name, mut all): (String, Vec<GpuWedge>) = match change {
            Change::Applied(w) => (w.name_any(), state.objects().cloned().collect()),
            Change::Deleted(w) => {
                let mut all: Vec<GpuWedge> = state.objects().cloned().collect();
                all.push(w.clone());
                (w.name_any(), all)
            }
        };
        all.sort_by_key(|w| w.name_any());
        let rows = present::rows(&all, Timestamp::now(), wide);
        let row = rows.into_iter().find(|r| r.first() == Some(&name));
        Ok(row.is_none_or(|r| emit(&format!("{}\n", cols.line(&r)))))
    })
    .await
}

/// `list -o json|yaml`: a `List` of the objects; with `watch`, every object then every change
/// one by one, as `kubectl get -w -o json|yaml` prints them.
pub(crate) async fn list_data(
    client: &Client,
    format: DataFormat,
    watch: bool,
) -> Result<(), CliError> {
    let (api, ar) = dynamic_wedges(client);
    let list = api
        .list(&ListParams::default())
        .await
        .map_err(|e| wedge_target("list", None).err(e))?
        .items;
    if !watch {
        let items: Vec<DynamicObject> = list.into_iter().map(|o| present::shown(o, &ar)).collect();
        print!("{}", encode(&present::list_object(&items), format)?);
        return Ok(());
    }
    let item = |o: &DynamicObject| -> Result<String, CliError> {
        present::render_watch_item(&present::shown(o.clone(), &ar), format)
            .map_err(CliError::Encode)
    };
    for o in &list {
        if !emit(&item(o)?) {
            return Ok(());
        }
    }
    watch_changes(api, list, |_, change| {
        let (Change::Applied(o) | Change::Deleted(o)) = change;
        Ok(emit(&item(&o)?))
    })
    .await
}

/// Follows the watcher from the objects already printed and hands each change to `print`
/// (which says whether to go on), until Ctrl-C or SIGTERM, or stdout is closed. Lost
/// connections are retried with a backoff and reported on stderr; a refused watch ends it.
pub(crate) async fn watch_changes<K>(
    api: Api<K>,
    printed: Vec<K>,
    mut print: impl FnMut(&Watch<K>, Change<K>) -> Result<bool, CliError>,
) -> Result<(), CliError>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    let mut state = Watch::new(printed);
    let mut stream = Box::pin(watcher(api, watcher::Config::default()).default_backoff());
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| CliError::Config(format!("cannot handle SIGTERM: {e}")))?;
    loop {
        let event = tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = term.recv() => return Ok(()),
            event = stream.next() => event,
        };
        match event {
            None => return Ok(()),
            Some(Ok(event)) => {
                for change in state.on(event) {
                    if !print(&state, change)? {
                        return Ok(());
                    }
                }
            }
            Some(Err(
                watcher::Error::InitialListFailed(e)
                | watcher::Error::WatchStartFailed(e)
                | watcher::Error::WatchFailed(e),
            )) if matches!(&e, kube::Error::Api(s) if s.code == 403) => {
                return Err(wedge_target("watch", None).err(e));
            }
            Some(Err(e)) => eprintln!("warning: {e} (retrying)"),
        }
    }
}

/// Writes to stdout; false once stdout is gone (a closed pipe ends a watch quietly).
pub(crate) fn emit(text: &str) -> bool {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .is_ok()
}

pub(crate) fn encode<T: serde::Serialize + ?Sized>(
    v: &T,
    format: DataFormat,
) -> Result<String, CliError> {
    present::render_data(v, format).map_err(CliError::Encode)
}

/// GpuWedges as the API returns them, every field kept (also those this build does not know).
pub(crate) fn dynamic_wedges(client: &Client) -> (Api<DynamicObject>, ApiResource) {
    let ar = ApiResource::erase::<GpuWedge>(&());
    (Api::all_with(client.clone(), &ar), ar)
}
