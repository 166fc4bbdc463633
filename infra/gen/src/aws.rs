//! CloudFormation templates under `infra/aws/`.

use anyhow::Result;

use crate::{Function, Output};

/// The templates of all functions.
pub fn render(_functions: &[Function]) -> Result<Vec<Output>> {
    Ok(Vec::new())
}
