//! Kubernetes manifests (and KEDA scalers) under `infra/k8s/`.

use anyhow::Result;

use crate::{Function, Output};

/// The manifests of all functions.
pub fn render(_functions: &[Function]) -> Result<Vec<Output>> {
    Ok(Vec::new())
}
