//! The two backends behind the gateway: users (plain HTTP) and orders (HTTP in, gRPC
//! out to payments, with a compensating action when payment fails for good).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::{Path, State};
use axum::http::header::RETRY_AFTER;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use crate::payments::{ChargeRequest, PaymentsClient};

pub fn users() -> Router {
    Router::new().route("/users/{id}", get(user))
}

async fn user(Path(id): Path<u32>) -> Response {
    tracing::info!(user = id, "users: lookup");
    match id {
        1 => Json(serde_json::json!({ "id": 1, "name": "Alice" })).into_response(),
        2 => Json(serde_json::json!({ "id": 2, "name": "Bob" })).into_response(),
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OrderStatus {
    Pending,
    Paid,
    Cancelled,
}

#[derive(Debug, Clone, Serialize)]
pub struct Order {
    pub id: u64,
    pub item: String,
    pub amount_cents: u64,
    pub status: OrderStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payment_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct NewOrder {
    pub item: String,
    pub amount_cents: u64,
}

/// The orders service's state: its table, and its resilient payments client.
pub struct Orders {
    table: Mutex<HashMap<u64, Order>>,
    next_id: AtomicU64,
    payments: PaymentsClient,
}

impl Orders {
    pub fn new(payments: PaymentsClient) -> Self {
        Self {
            table: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            payments,
        }
    }

    fn set(&self, order: &Order) {
        self.table
            .lock()
            .expect("orders table")
            .insert(order.id, order.clone());
    }
}

pub fn orders(orders: Arc<Orders>) -> Router {
    Router::new()
        .route("/orders", post(place_order))
        .route("/orders/{id}", get(order))
        .with_state(orders)
}

async fn order(State(orders): State<Arc<Orders>>, Path(id): Path<u64>) -> Response {
    let found = orders.table.lock().expect("orders table").get(&id).cloned();
    match found {
        Some(order) => Json(order).into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

/// Step 1 records the order; step 2 charges it. When the charge fails for good, step 1 is
/// undone: the order is cancelled (the compensating action) and the client is told so.
async fn place_order(State(orders): State<Arc<Orders>>, Json(new): Json<NewOrder>) -> Response {
    let mut order = Order {
        id: orders.next_id.fetch_add(1, Ordering::SeqCst),
        item: new.item,
        amount_cents: new.amount_cents,
        status: OrderStatus::Pending,
        payment_id: None,
        reason: None,
    };
    orders.set(&order);
    tracing::info!(order = order.id, "orders: created, charging");

    let charge = ChargeRequest {
        order_id: order.id.to_string(),
        amount_cents: order.amount_cents,
    };
    match orders.payments.charge(charge).await {
        Ok(reply) => {
            order.status = OrderStatus::Paid;
            order.payment_id = Some(reply.payment_id);
            orders.set(&order);
            tracing::info!(order = order.id, "orders: paid");
            (StatusCode::CREATED, Json(order)).into_response()
        }
        Err(status) => {
            order.status = OrderStatus::Cancelled;
            order.reason = Some(format!("payment failed: {:?}", status.code()));
            orders.set(&order);
            tracing::warn!(order = order.id, code = ?status.code(), "orders: payment failed, order cancelled");
            let mut response = (StatusCode::SERVICE_UNAVAILABLE, Json(order)).into_response();
            let delay = status.metadata().get("retry-after");
            if let Some(value) =
                delay.and_then(|delay| HeaderValue::from_bytes(delay.as_bytes()).ok())
            {
                response.headers_mut().insert(RETRY_AFTER, value);
            }
            response
        }
    }
}
