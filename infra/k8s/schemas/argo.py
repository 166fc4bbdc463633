#!/usr/bin/env python3
"""Writes the committed Argo Rollouts schemas (rollout-argoproj-v1alpha1.json,
analysistemplate-argoproj-v1alpha1.json): the `spec` fields, types and required keys of the
openAPIV3Schema in Argo Rollouts' CRDs (argoproj/argo-rollouts manifests/crds/rollout-crd.yaml
and analysis-template-crd.yaml, v1alpha1), with every object whose properties the CRD lists
closed (`additionalProperties: false`), as the API server's strict field validation rejects
unknown fields. Blocks Sluice does not use (blue-green, traffic routing, experiments, the
other metric providers) stay open objects.

The Rollout's `spec.template` is a PodTemplateSpec: it is checked against the Kubernetes
strict schema of the committed deployment-apps-v1.json (its definitions copied in under
`$defs`), which is stricter than the CRD's copy of the pod schema. See README.md here."""
import json
import pathlib

OUT = pathlib.Path(__file__).parent
I32 = {"type": "integer", "minimum": -2147483648, "maximum": 2147483647}
I64 = {"type": "integer"}
BOOL = {"type": "boolean"}
INT_OR_STRING = {"anyOf": [{"type": "integer"}, {"type": "string"}]}
OPEN = {"type": "object"}


def s():
    return {"type": "string"}


def obj(props, required=(), closed=True):
    o = {"type": "object", "properties": props}
    if required:
        o["required"] = list(required)
    if closed:
        o["additionalProperties"] = False
    return o


def array(items):
    return {"type": "array", "items": items}


STRING_MAP = {"type": "object", "additionalProperties": s()}
# ObjectMeta is the API server's, not the CRD's: only what the manifests set is checked.
META = obj(
    {"name": s(), "namespace": s(), "labels": STRING_MAP, "annotations": STRING_MAP},
    ["name"],
    closed=False,
)
POD_METADATA = obj({"annotations": STRING_MAP, "labels": STRING_MAP})


def top(kind, spec, defs=None):
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": f"Argo Rollouts {kind} (argoproj.io/v1alpha1)",
        **obj(
            {
                "apiVersion": {"const": "argoproj.io/v1alpha1"},
                "kind": {"const": kind},
                "metadata": META,
                "spec": spec,
                "status": OPEN,
            },
            ["apiVersion", "kind", "metadata", "spec"],
        ),
    }
    if defs:
        schema["$defs"] = defs
    return schema


# --- Rollout ---------------------------------------------------------------------------

ROLLOUT_ARG = obj(
    {
        "name": s(),
        "value": s(),
        "valueFrom": obj(
            {
                "fieldRef": obj({"fieldPath": s()}, ["fieldPath"]),
                "podTemplateHashValue": {"type": "string", "enum": ["Stable", "Latest"]},
            }
        ),
    },
    ["name"],
)
ANALYSIS_COMMON = {
    "analysisRunMetadata": POD_METADATA,
    "args": array(ROLLOUT_ARG),
    "dryRun": array(obj({"metricName": s()}, ["metricName"])),
    "measurementRetention": array(obj({"limit": I32, "metricName": s()}, ["limit", "metricName"])),
    "templates": array(obj({"clusterScope": BOOL, "templateName": s()})),
}
BACKGROUND_ANALYSIS = obj({**ANALYSIS_COMMON, "startingStep": I32})
STEP = obj(
    {
        "analysis": obj(ANALYSIS_COMMON),
        "experiment": OPEN,
        "pause": obj({"duration": INT_OR_STRING}),
        "plugin": OPEN,
        "setCanaryScale": obj({"matchTrafficWeight": BOOL, "replicas": I32, "weight": I32}),
        "setHeaderRoute": OPEN,
        "setMirrorRoute": OPEN,
        "setWeight": I32,
    }
)
CANARY = obj(
    {
        "abortScaleDownDelaySeconds": I32,
        "analysis": BACKGROUND_ANALYSIS,
        "antiAffinity": OPEN,
        "canaryMetadata": POD_METADATA,
        "canaryService": s(),
        "dynamicStableScale": BOOL,
        "maxSurge": INT_OR_STRING,
        "maxUnavailable": INT_OR_STRING,
        "minPodsPerReplicaSet": I32,
        "pingPong": OPEN,
        "scaleDownDelayRevisionLimit": I32,
        "scaleDownDelaySeconds": I32,
        "stableMetadata": POD_METADATA,
        "stableService": s(),
        "steps": array(STEP),
        "trafficRouting": OPEN,
    }
)
PREFIX = "#/$defs/"


def k8s_defs(*roots):
    """The definitions `roots` need, transitively, from the committed Kubernetes bundle."""
    bundle = json.loads((OUT / "deployment-apps-v1.json").read_text())["$defs"]
    wanted, done = set(roots), {}

    def refs(node):
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith(PREFIX):
                yield ref[len(PREFIX):]
            for v in node.values():
                yield from refs(v)
        elif isinstance(node, list):
            for v in node:
                yield from refs(v)

    while wanted - done.keys():
        name = sorted(wanted - done.keys())[0]
        done[name] = bundle[name]
        wanted.update(refs(bundle[name]))
    return dict(sorted(done.items()))


POD_TEMPLATE = "io.k8s.api.core.v1.PodTemplateSpec"
LABEL_SELECTOR = "io.k8s.apimachinery.pkg.apis.meta.v1.LabelSelector"
ROLLOUT_SPEC = obj(
    {
        "analysis": obj({"successfulRunHistoryLimit": I32, "unsuccessfulRunHistoryLimit": I32}),
        "minReadySeconds": I32,
        "paused": BOOL,
        "progressDeadlineAbort": BOOL,
        "progressDeadlineSeconds": I32,
        "replicas": I32,
        "restartAt": s(),
        "revisionHistoryLimit": I32,
        "rollbackWindow": obj({"revisions": I32}),
        "selector": {"$ref": PREFIX + LABEL_SELECTOR},
        "strategy": obj({"blueGreen": OPEN, "canary": CANARY}),
        "template": {"$ref": PREFIX + POD_TEMPLATE},
        "workloadRef": obj({"apiVersion": s(), "kind": s(), "name": s(), "scaleDown": s()}),
    }
)

# --- AnalysisTemplate ------------------------------------------------------------------

TEMPLATE_ARG = obj(
    {
        "name": s(),
        "value": s(),
        "valueFrom": obj(
            {
                "fieldRef": obj({"fieldPath": s()}, ["fieldPath"]),
                "secretKeyRef": obj({"key": s(), "name": s()}, ["key", "name"]),
            }
        ),
    },
    ["name"],
)
PROMETHEUS = obj(
    {
        "address": s(),
        "authentication": OPEN,
        "headers": array(obj({"key": s(), "value": s()}, ["key", "value"])),
        "insecure": BOOL,
        "query": s(),
        "rangeQuery": OPEN,
        "timeout": I64,
    }
)
PROVIDER = obj(
    {
        "prometheus": PROMETHEUS,
        **{
            p: OPEN
            for p in [
                "cloudWatch", "datadog", "graphite", "influxdb", "job", "kayenta", "newRelic",
                "plugin", "skywalking", "wavefront", "web",
            ]
        },
    }
)
METRIC = obj(
    {
        "consecutiveErrorLimit": INT_OR_STRING,
        "consecutiveSuccessLimit": INT_OR_STRING,
        "count": INT_OR_STRING,
        "failureCondition": s(),
        "failureLimit": INT_OR_STRING,
        "inconclusiveLimit": INT_OR_STRING,
        "initialDelay": s(),
        "interval": s(),
        "name": s(),
        "provider": PROVIDER,
        "successCondition": s(),
    },
    ["name", "provider"],
)
ANALYSIS_TEMPLATE_SPEC = obj(
    {
        "args": array(TEMPLATE_ARG),
        "dryRun": array(obj({"metricName": s()}, ["metricName"])),
        "measurementRetention": array(obj({"limit": I32, "metricName": s()}, ["limit", "metricName"])),
        "metrics": array(METRIC),
        "ttlStrategy": OPEN,
    },
    ["metrics"],
)

for name, schema in [
    ("rollout-argoproj-v1alpha1.json", top("Rollout", ROLLOUT_SPEC, k8s_defs(POD_TEMPLATE, LABEL_SELECTOR))),
    ("analysistemplate-argoproj-v1alpha1.json", top("AnalysisTemplate", ANALYSIS_TEMPLATE_SPEC)),
]:
    (OUT / name).write_text(json.dumps(schema, indent=1, sort_keys=True) + "\n")
    print(name, f"({len(schema.get('$defs', {}))} Kubernetes definitions)" if "$defs" in schema else "")
