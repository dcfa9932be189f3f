//! The operator's own API requests, counted by verb and resource as they leave the client
//! (`unwedge_operator_api_requests_total`): what one wedge costs the API server, apart from
//! the agents', kwok's and everyone else's requests that `apiserver_request_total` mixes in.

use http::{Method, Request};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

/// `{verb, resource}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Call {
    /// `get`, `list`, `watch`, `create`, `update`, `patch`, `delete`.
    pub verb: String,
    /// The resource, with its subresource: `gpuwedges/status`, `pods/eviction`.
    pub resource: String,
}

/// The verb and resource of a request to the API server (`None`: not a resource path).
pub fn classify(method: &Method, path: &str, query: Option<&str>) -> Option<Call> {
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let rest = match segs.as_slice() {
        ["api", _, rest @ ..] => rest,
        ["apis", _, _, rest @ ..] => rest,
        _ => return None,
    };
    let rest = match rest {
        ["namespaces", _, r, more @ ..] => {
            let mut v = vec![*r];
            v.extend_from_slice(more);
            v
        }
        r => r.to_vec(),
    };
    let (resource, named, sub) = match rest.as_slice() {
        [r] => (*r, false, None),
        [r, _] => (*r, true, None),
        [r, _, s, ..] => (*r, true, Some(*s)),
        [] => return None,
    };
    let watch = query.is_some_and(|q| q.split('&').any(|kv| kv == "watch=true" || kv == "watch=1"));
    let verb = match *method {
        Method::GET if watch => "watch",
        Method::GET if named => "get",
        Method::GET => "list",
        Method::POST => "create",
        Method::PUT => "update",
        Method::PATCH => "patch",
        Method::DELETE => "delete",
        _ => "other",
    };
    Some(Call {
        verb: verb.into(),
        resource: match sub {
            Some(s) => format!("{resource}/{s}"),
            None => resource.to_string(),
        },
    })
}

/// Counts `req` in `family` and hands it on unchanged (a `MapRequestLayer` function).
pub fn count<B>(family: &Family<Call, Counter>, req: Request<B>) -> Request<B> {
    if let Some(c) = classify(req.method(), req.uri().path(), req.uri().query()) {
        // In the span of the reconcile that sends it: the requests of one wedge, by step.
        tracing::debug!(verb = %c.verb, resource = %c.resource, path = req.uri().path(), "API request");
        family.get_or_create(&c).inc();
    }
    req
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(m: Method, path: &str, q: Option<&str>) -> (String, String) {
        let c = classify(&m, path, q).expect("a resource path");
        (c.verb, c.resource)
    }

    #[test]
    fn verbs_and_resources_of_the_paths_the_operator_uses() {
        let s = |a: &str, b: &str| (a.to_string(), b.to_string());
        assert_eq!(
            c(
                Method::PATCH,
                "/apis/unwedge.io/v1alpha1/gpuwedges/w1/status",
                None
            ),
            s("patch", "gpuwedges/status")
        );
        assert_eq!(
            c(
                Method::GET,
                "/api/v1/pods",
                Some("fieldSelector=spec.nodeName%3Dn")
            ),
            s("list", "pods")
        );
        assert_eq!(
            c(
                Method::GET,
                "/api/v1/nodes",
                Some("watch=true&resourceVersion=1")
            ),
            s("watch", "nodes")
        );
        assert_eq!(
            c(
                Method::POST,
                "/api/v1/namespaces/default/pods/p/eviction",
                None
            ),
            s("create", "pods/eviction")
        );
        assert_eq!(
            c(
                Method::PUT,
                "/apis/coordination.k8s.io/v1/namespaces/ns/leases/op",
                None
            ),
            s("update", "leases")
        );
        assert_eq!(
            c(
                Method::POST,
                "/apis/events.k8s.io/v1/namespaces/default/events",
                None
            ),
            s("create", "events")
        );
        assert_eq!(
            c(Method::GET, "/api/v1/namespaces/ns", None),
            s("get", "namespaces")
        );
        assert!(classify(&Method::GET, "/version", None).is_none());
    }
}
