//! What lapin's errors mean here: a refused login or a failed TLS handshake is configuration
//! (no retry), a missing queue names `provision`, the rest is a broker failure with its cause.

use lapin::{
    protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError},
    ErrorKind,
};

use crate::{config::redact_url, error::Error};

pub(super) fn broker(what: &str, e: lapin::Error) -> Error {
    Error::transport(format!("rabbitmq {what}"), e)
}

/// A queue that should exist but does not (declaring is off, or someone deleted it).
pub(super) fn missing_queue(name: &str, e: lapin::Error) -> Error {
    match e.kind() {
        ErrorKind::ProtocolError(amqp)
            if amqp.kind() == &AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND) =>
        {
            Error::transport_msg(format!(
                "RabbitMQ has no queue {name:?}: run `provision`, or import \
                 infra/rabbitmq/definitions.json (this command does not declare queues; `run` \
                 does when transport.declare is on)"
            ))
        }
        _ => broker(&format!("queue {name:?}"), e),
    }
}

/// A refused login, an unknown virtual host or a failed TLS handshake is a configuration
/// error: retrying cannot help.
pub(super) fn connect_error(url: &str, e: lapin::Error) -> Error {
    let shown = redact_url(url);
    if let ErrorKind::IOError(io) = e.kind() {
        // rustls reports a peer that does not speak TLS, or a certificate it rejects, as
        // invalid data; a broker going away mid-handshake is a reset or an EOF instead.
        if url.starts_with("amqps://") && io.kind() == std::io::ErrorKind::InvalidData {
            return Error::Config(format!(
                "key `transport.url`: the TLS handshake with {shown} failed ({io}): is that \
                 port a TLS listener (5671 by default, 5672 is plain amqp://), does the \
                 broker's certificate name that host, and is it signed by a CA of \
                 `transport.tls_ca_file` (or of the system's roots)?"
            ));
        }
    }
    if let ErrorKind::ProtocolError(amqp) = e.kind() {
        match amqp.kind() {
            AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED) => {
                return Error::Config(format!(
                    "key `transport.url`: RabbitMQ refused the login to {shown} (user, password \
                     or permissions on the virtual host): {}",
                    amqp.get_message()
                ))
            }
            AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED) => {
                return Error::Config(format!(
                    "key `transport.url`: RabbitMQ does not allow {shown} (does the virtual host \
                     exist?): {}",
                    amqp.get_message()
                ))
            }
            _ => {}
        }
    }
    Error::transport(format!("rabbitmq: connect to {shown}"), e)
}

pub(super) fn declare_error(name: &str, e: lapin::Error) -> Error {
    if let ErrorKind::ProtocolError(amqp) = e.kind() {
        if amqp.kind() == &AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED) {
            return Error::Config(format!(
                "RabbitMQ has {name:?} with other arguments than Sluice declares ({}): a changed \
                 retry.max_deliveries cannot be applied to an existing queue; use a policy or \
                 recreate the queue",
                amqp.get_message()
            ));
        }
    }
    broker(&format!("declare {name:?}"), e)
}

/// The outcome of an ack/nack through the ack window: `Ok(false)` (its channel is gone or it
/// was settled) and errors both mean the broker will redeliver: the lease is lost.
pub(super) fn settled(r: lapin::Result<bool>, id: &str) -> crate::error::Result<()> {
    match r {
        Ok(true) => Ok(()),
        Ok(false) => Err(Error::LeaseLost(id.to_owned())),
        Err(e) => {
            tracing::debug!(id, error = %e, "settling failed on a closed channel");
            Err(Error::LeaseLost(id.to_owned()))
        }
    }
}
