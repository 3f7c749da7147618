//! Events in both API groups. They are stored once, as core/v1 Events, and converted to
//! and from events.k8s.io/v1 with the field mapping the apiserver uses (`regarding` is
//! `involvedObject`, `note` is `message`, `reportingController` is `reportingComponent`,
//! `deprecated*` are the old counters and timestamps), so an Event posted through either
//! group is listed by both, as on a real cluster.

use k8s_openapi::api::core::v1::{Event as CoreEvent, EventSeries as CoreSeries};
use k8s_openapi::api::events::v1::{Event as NewEvent, EventSeries as NewSeries};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;

/// Which API group an Event request used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventApi {
    /// `/api/v1/.../events` (core/v1).
    Core,
    /// `/apis/events.k8s.io/v1/.../events`, what `kube_runtime::events::Recorder` posts to.
    EventsV1,
}

impl EventApi {
    pub fn api_version(self) -> &'static str {
        match self {
            Self::Core => "v1",
            Self::EventsV1 => "events.k8s.io/v1",
        }
    }
}

pub fn to_events_v1(e: &CoreEvent) -> NewEvent {
    NewEvent {
        action: e.action.clone(),
        deprecated_count: e.count,
        deprecated_first_timestamp: e.first_timestamp.clone(),
        deprecated_last_timestamp: e.last_timestamp.clone(),
        deprecated_source: e.source.clone(),
        event_time: e.event_time.clone(),
        metadata: e.metadata.clone(),
        note: e.message.clone(),
        reason: e.reason.clone(),
        regarding: Some(e.involved_object.clone()),
        related: e.related.clone(),
        reporting_controller: e.reporting_component.clone(),
        reporting_instance: e.reporting_instance.clone(),
        series: e.series.as_ref().map(|s| NewSeries {
            count: s.count.unwrap_or_default(),
            last_observed_time: s
                .last_observed_time
                .clone()
                .unwrap_or(MicroTime(k8s_openapi::jiff::Timestamp::UNIX_EPOCH)),
        }),
        type_: e.type_.clone(),
    }
}

pub fn from_events_v1(e: NewEvent) -> CoreEvent {
    CoreEvent {
        action: e.action,
        count: e.deprecated_count,
        event_time: e.event_time,
        first_timestamp: e.deprecated_first_timestamp,
        involved_object: e.regarding.unwrap_or_default(),
        last_timestamp: e.deprecated_last_timestamp,
        message: e.note,
        metadata: e.metadata,
        reason: e.reason,
        related: e.related,
        reporting_component: e.reporting_controller,
        reporting_instance: e.reporting_instance,
        series: e.series.map(|s| CoreSeries {
            count: Some(s.count),
            last_observed_time: Some(s.last_observed_time),
        }),
        source: e.deprecated_source,
        type_: e.type_,
    }
}

/// The events.k8s.io/v1 create validation (the rules a real apiserver applies to new
/// Events), so a recorder that would be refused by a cluster is refused here too.
pub fn validate_events_v1(e: &NewEvent) -> Vec<String> {
    let mut causes = Vec::new();
    if e.event_time.is_none() {
        causes.push("eventTime: Required value".to_string());
    }
    for (field, value, max) in [
        ("reportingController", &e.reporting_controller, 253),
        ("reportingInstance", &e.reporting_instance, 128),
        ("action", &e.action, 128),
        ("reason", &e.reason, 128),
    ] {
        match value.as_deref() {
            None | Some("") => causes.push(format!("{field}: Required value")),
            Some(v) if v.len() > max => causes.push(format!(
                "{field}: Too long: may not be more than {max} bytes"
            )),
            Some(_) => {}
        }
    }
    if e.note.as_deref().is_some_and(|n| n.len() > 1024) {
        causes.push("note: Too long: may not be more than 1024 bytes".to_string());
    }
    validate_type(e.type_.as_deref(), &mut causes);
    causes
}

/// The core/v1 rules that apply to every Event.
pub fn validate_core(e: &CoreEvent) -> Vec<String> {
    let mut causes = Vec::new();
    if e.type_.is_some() {
        validate_type(e.type_.as_deref(), &mut causes);
    }
    causes
}

fn validate_type(t: Option<&str>, causes: &mut Vec<String>) {
    match t {
        Some("Normal") | Some("Warning") => {}
        other => causes.push(format!(
            "type: Unsupported value: {:?}: supported values: \"Normal\", \"Warning\"",
            other.unwrap_or("")
        )),
    }
}
