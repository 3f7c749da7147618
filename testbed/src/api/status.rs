//! Kubernetes `Status` failures: every error the server answers is one of these, rendered
//! as the `metav1.Status` body clients parse (`kube::Error::Api`, kubectl's messages).

use serde_json::{json, Value};

/// An API failure as the real apiserver reports it: HTTP code, machine-readable reason
/// (`NotFound`, `AlreadyExists`, `Conflict`, `Invalid`, `Expired`, ...) and a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code} {reason}: {message}")]
pub struct ApiError {
    pub code: u16,
    pub reason: String,
    pub message: String,
    /// `details` of the Status: the resource kind (plural) and object name, when known.
    pub details: Option<(String, String)>,
}

impl ApiError {
    pub(crate) fn new(code: u16, reason: &str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason: reason.to_string(),
            message: message.into(),
            details: None,
        }
    }

    pub(crate) fn with_details(mut self, kind: &str, name: &str) -> Self {
        self.details = Some((kind.to_string(), name.to_string()));
        self
    }

    pub(crate) fn not_found(resource: &str, name: &str) -> Self {
        Self::new(404, "NotFound", format!("{resource} \"{name}\" not found"))
            .with_details(resource, name)
    }

    pub(crate) fn no_route() -> Self {
        Self::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        )
    }

    pub(crate) fn already_exists(resource: &str, name: &str) -> Self {
        Self::new(
            409,
            "AlreadyExists",
            format!("{resource} \"{name}\" already exists"),
        )
        .with_details(resource, name)
    }

    pub(crate) fn conflict(resource: &str, name: &str, why: &str) -> Self {
        Self::new(
            409,
            "Conflict",
            format!("Operation cannot be fulfilled on {resource} \"{name}\": {why}"),
        )
        .with_details(resource, name)
    }

    /// 422 with the apiserver's wording: `Node "x" is invalid: field: reason`.
    pub(crate) fn invalid(kind: &str, resource: &str, name: &str, causes: &[String]) -> Self {
        Self::new(
            422,
            "Invalid",
            format!("{kind} \"{name}\" is invalid: {}", causes.join(", ")),
        )
        .with_details(resource, name)
    }

    pub(crate) fn unprocessable(message: impl Into<String>) -> Self {
        Self::new(422, "Invalid", message)
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    pub(crate) fn gone(message: impl Into<String>) -> Self {
        Self::new(410, "Expired", message)
    }

    pub(crate) fn method_not_allowed(method: &str) -> Self {
        Self::new(
            405,
            "MethodNotAllowed",
            format!("the server does not allow this method on the requested resource ({method})"),
        )
    }

    pub(crate) fn unsupported_media_type(content_type: &str) -> Self {
        Self::new(
            415,
            "UnsupportedMediaType",
            format!("the body of the request was in an unknown format ({content_type}); this test API accepts application/json and, for PATCH, application/merge-patch+json, application/json-patch+json and application/strategic-merge-patch+json"),
        )
    }

    /// The `metav1.Status` object for this failure.
    pub fn to_status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some((kind, name)) = &self.details {
            status["details"] = json!({ "name": name, "kind": kind });
        }
        status
    }
}

/// The `Status` a successful delete of a collection-less resource may answer with.
pub(crate) fn success_status(kind: &str, name: &str, uid: Option<&str>) -> Value {
    let mut details = json!({ "name": name, "kind": kind });
    if let Some(uid) = uid {
        details["uid"] = json!(uid);
    }
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Success",
        "details": details,
    })
}
