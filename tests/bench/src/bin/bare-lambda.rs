//! The baseline of the cold-start bench: a bare `lambda_runtime` SQS handler that does nothing
//! but answer with an empty `SqsBatchResponse`. Sluice's start-up (settings, logging, the SQS
//! client, the idempotency store, the function's state) is measured against it.

use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent};
use lambda_runtime::{service_fn, Error, LambdaEvent};

async fn handle(event: LambdaEvent<SqsEvent>) -> Result<SqsBatchResponse, Error> {
    let _ = event.payload.records.len();
    Ok(SqsBatchResponse::default())
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    lambda_runtime::run(service_fn(handle)).await
}
