//! `-o json|yaml`: output formats and the objects as kubectl prints them.

use kube::api::{ApiResource, DynamicObject, TypeMeta};
use serde::Serialize;

/// How `list` prints (`-o`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ListFormat {
    /// The table.
    #[default]
    Table,
    /// The table with the policy, card, attempts and approval.
    Wide,
    /// The GpuWedges as JSON (a `List`).
    Json,
    /// The GpuWedges as YAML (a `List`).
    Yaml,
}

impl ListFormat {
    /// The data format when the objects themselves are printed, `None` for a table.
    pub fn data(self) -> Option<DataFormat> {
        match self {
            ListFormat::Table | ListFormat::Wide => None,
            ListFormat::Json => Some(DataFormat::Json),
            ListFormat::Yaml => Some(DataFormat::Yaml),
        }
    }
}

/// `-o` of `describe` and `budget`: data instead of text.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DataFormat {
    /// JSON, indented by four spaces as kubectl does.
    Json,
    /// YAML.
    Yaml,
}

/// Prints data as `kubectl get -o json|yaml` does: JSON indented by four spaces, YAML as one
/// document without `---`; both end with a newline.
pub fn render_data<T: Serialize + ?Sized>(v: &T, f: DataFormat) -> Result<String, String> {
    match f {
        DataFormat::Json => {
            let mut buf = Vec::new();
            let fmt = serde_json::ser::PrettyFormatter::with_indent(b"    ");
            let mut ser = serde_json::Serializer::with_formatter(&mut buf, fmt);
            v.serialize(&mut ser).map_err(|e| e.to_string())?;
            let mut out = String::from_utf8(buf).map_err(|e| e.to_string())?;
            out.push('\n');
            Ok(out)
        }
        DataFormat::Yaml => serde_yaml::to_string(v).map_err(|e| e.to_string()),
    }
}

/// One object of a watch stream: JSON on one line, or a YAML document opened by `---`.
pub fn render_watch_item<T: Serialize + ?Sized>(v: &T, f: DataFormat) -> Result<String, String> {
    match f {
        DataFormat::Json => {
            let mut out = serde_json::to_string(v).map_err(|e| e.to_string())?;
            out.push('\n');
            Ok(out)
        }
        DataFormat::Yaml => Ok(format!(
            "---\n{}",
            serde_yaml::to_string(v).map_err(|e| e.to_string())?
        )),
    }
}

/// The `List` kubectl prints for `get -o json|yaml` of a collection.
pub fn list_object<T: Serialize>(items: &[T]) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "List",
        "metadata": {"resourceVersion": ""},
        "items": items,
    })
}

/// An object as kubectl prints it: `apiVersion` and `kind` present (a list's items may lack
/// them), `metadata.managedFields` hidden as kubectl hides them by default.
pub fn shown(mut o: DynamicObject, ar: &ApiResource) -> DynamicObject {
    if o.types.is_none() {
        o.types = Some(TypeMeta {
            api_version: ar.api_version.clone(),
            kind: ar.kind.clone(),
        });
    }
    o.metadata.managed_fields = None;
    o
}
