#!/usr/bin/env python3
"""Writes the committed KEDA schemas (scaledobject-keda-v1alpha1.json,
triggerauthentication-keda-v1alpha1.json): the `spec` fields, types and required keys of the
openAPIV3Schema in KEDA's CRDs (kedacore/keda config/crd/bases/keda.sh_scaledobjects.yaml and
keda.sh_triggerauthentications.yaml, v1alpha1), with every object whose properties the CRD
lists closed (`additionalProperties: false`), as the API server's strict field validation
rejects unknown fields. Blocks Sluice does not use (`advanced`, the secret-manager providers)
stay open objects. See README.md in this folder."""
import json
import pathlib

OUT = pathlib.Path(__file__).parent
I32 = {"type": "integer", "minimum": -2147483648, "maximum": 2147483647}


def s():
    return {"type": "string"}


def obj(props, required=(), closed=True):
    o = {"type": "object", "properties": props}
    if required:
        o["required"] = list(required)
    if closed:
        o["additionalProperties"] = False
    return o


def array_of(props, required):
    return {"type": "array", "items": obj({k: s() for k in props}, required)}


# ObjectMeta is the API server's, not the CRD's: only what the manifests set is checked.
META = obj(
    {
        "name": s(),
        "namespace": s(),
        "labels": {"type": "object", "additionalProperties": s()},
        "annotations": {"type": "object", "additionalProperties": s()},
    },
    ["name"],
    closed=False,
)


def top(kind, spec):
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": f"KEDA {kind} (keda.sh/v1alpha1)",
        **obj(
            {
                "apiVersion": {"const": "keda.sh/v1alpha1"},
                "kind": {"const": kind},
                "metadata": META,
                "spec": spec,
                "status": {"type": "object"},
            },
            ["apiVersion", "kind", "metadata", "spec"],
        ),
    }


SCALED_OBJECT = obj(
    {
        "advanced": {"type": "object"},
        "cooldownPeriod": I32,
        "fallback": obj({"failureThreshold": I32, "replicas": I32}, ["failureThreshold", "replicas"]),
        "idleReplicaCount": I32,
        "maxReplicaCount": I32,
        "minReplicaCount": I32,
        "pollingInterval": I32,
        "scaleTargetRef": obj(
            {"apiVersion": s(), "envSourceContainerName": s(), "kind": s(), "name": s()}, ["name"]
        ),
        "triggers": {
            "type": "array",
            "items": obj(
                {
                    "authenticationRef": obj({"kind": s(), "name": s()}, ["name"]),
                    "metadata": {"type": "object", "additionalProperties": s()},
                    "metricType": s(),
                    "name": s(),
                    "type": s(),
                },
                ["metadata", "type"],
            ),
        },
    },
    ["scaleTargetRef", "triggers"],
)

POD_IDENTITY = obj(
    {
        "provider": {"type": "string", "enum": ["azure-workload", "gcp", "aws", "aws-eks", "none"]},
        "identityId": s(),
        "identityOwner": {"type": "string", "enum": ["keda", "workload"]},
        "identityTenantId": s(),
        "identityAuthorityHost": s(),
        "roleArn": s(),
    },
    ["provider"],
)

TRIGGER_AUTHENTICATION = obj(
    {
        "podIdentity": POD_IDENTITY,
        "secretTargetRef": array_of(["parameter", "name", "key"], ["parameter", "name", "key"]),
        "env": array_of(["parameter", "name", "containerName"], ["name", "parameter"]),
        "configMapTargetRef": array_of(["parameter", "name", "key"], ["key", "name", "parameter"]),
        "boundServiceAccountToken": array_of(
            ["parameter", "serviceAccountName"], ["parameter", "serviceAccountName"]
        ),
        "awsSecretManager": {"type": "object"},
        "azureKeyVault": {"type": "object"},
        "gcpSecretManager": {"type": "object"},
        "hashiCorpVault": {"type": "object"},
    }
)

for name, kind, spec in [
    ("scaledobject-keda-v1alpha1.json", "ScaledObject", SCALED_OBJECT),
    ("triggerauthentication-keda-v1alpha1.json", "TriggerAuthentication", TRIGGER_AUTHENTICATION),
]:
    (OUT / name).write_text(json.dumps(top(kind, spec), indent=1, sort_keys=True) + "\n")
    print(name)
