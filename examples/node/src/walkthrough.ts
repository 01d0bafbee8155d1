// The shop walk-through from Node through the edge: gRPC over HTTP/2 (Connect's gRPC transport) with the
// TypeScript generated from the same contracts (@shop-mesh/api).
//
//   npm run build && node dist/walkthrough.js --edge localhost:8080
//
// Signs up a user, orders, watches the order to PAID (server streaming), shows a rejected order's
// INVALID_ARGUMENT with its google.rpc.BadRequest field violations, then cancels (the payment is refunded).
//
// Authentication (when the edge verifies JWTs): SHOP_TOKEN is sent as `authorization: Bearer …` on every
// call; SHOP_TOKEN_COMMAND, if set, is run after sign-up with the new user id as its last argument and
// must print a token for that user (e.g. `python -m shop_mesh.mesh token --user`), used from then on.
import { execFileSync } from "node:child_process";
import { randomUUID } from "node:crypto";
import { parseArgs } from "node:util";

import type { Interceptor } from "@connectrpc/connect";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { BadRequestSchema } from "@shop-mesh/api/google/rpc/error_details_pb";
import type { Money } from "@shop-mesh/api/shop/common/v1/money_pb";
import type { Order } from "@shop-mesh/api/shop/order/v1/order_pb";
import { OrderService, OrderState } from "@shop-mesh/api/shop/order/v1/order_pb";
import type { User } from "@shop-mesh/api/shop/user/v1/user_pb";
import { UserService } from "@shop-mesh/api/shop/user/v1/user_pb";

const TIMEOUT_MS = 10_000;
const WATCH_TIMEOUT_MS = 60_000;

const { values } = parseArgs({
  options: { edge: { type: "string", default: process.env.SHOP_EDGE ?? "localhost:8080" } },
});

let token: string | undefined = process.env.SHOP_TOKEN || undefined;
const bearer: Interceptor = (next) => async (req) => {
  if (token) req.header.set("authorization", `Bearer ${token}`);
  return next(req);
};

// Plaintext HTTP/2 (h2c) to the edge, like grpcurl -plaintext.
const transport = createGrpcTransport({ baseUrl: `http://${values.edge}`, interceptors: [bearer] });
const users = createClient(UserService, transport);
const orders = createClient(OrderService, transport);
const runId = randomUUID().replaceAll("-", "").slice(0, 12);

function money(amount: Money | undefined): string {
  if (!amount) return "-";
  return `${(Number(amount.units) + amount.nanos / 1e9).toFixed(2)} ${amount.currencyCode}`;
}

/** The gRPC name of a status code, e.g. INVALID_ARGUMENT (Connect's enum says InvalidArgument). */
function codeName(code: Code): string {
  return Code[code].replace(/([a-z])([A-Z])/g, "$1_$2").toUpperCase();
}

function stateName(state: OrderState): string {
  return `ORDER_STATE_${OrderState[state]}`;
}

async function signUp(): Promise<User> {
  const reply = await users.createUser(
    { requestId: `signup-${runId}`, email: `ada-${runId}@example.com`, displayName: "Ada" },
    { timeoutMs: TIMEOUT_MS },
  );
  if (!reply.user) throw new Error("CreateUser returned no user");
  console.log(`signed up: ${reply.user.userId} ${reply.user.email}`);
  return reply.user;
}

function userToken(userId: string): string | undefined {
  const command = process.env.SHOP_TOKEN_COMMAND;
  if (!command) return token;
  const [file, ...args] = command.split(/\s+/).filter(Boolean);
  if (!file) return token;
  return execFileSync(file, [...args, userId], { encoding: "utf8" }).trim();
}

async function order(userId: string, quantity = 2, suffix = ""): Promise<Order> {
  const reply = await orders.createOrder(
    {
      requestId: `order-${runId}${suffix}`,
      userId,
      lineItems: [{ sku: "book-42", quantity, unitPrice: { currencyCode: "EUR", units: 12n, nanos: 500_000_000 } }],
      paymentMethodToken: "tok_visa",
    },
    { timeoutMs: TIMEOUT_MS },
  );
  if (!reply.order) throw new Error("CreateOrder returned no order");
  console.log(`ordered: ${reply.order.orderId} ${stateName(reply.order.state)} total ${money(reply.order.total)}`);
  return reply.order;
}

/** Every state change until the server ends the stream (the order is final). */
async function watch(orderId: string): Promise<OrderState> {
  let last = OrderState.UNSPECIFIED;
  for await (const reply of orders.watchOrder({ orderId }, { timeoutMs: WATCH_TIMEOUT_MS })) {
    if (!reply.event) continue;
    last = reply.event.state;
    console.log(`event ${reply.event.sequence}: ${stateName(last)}`);
  }
  return last;
}

async function invalidOrder(userId: string): Promise<void> {
  try {
    await order(userId, 0, "-invalid");
  } catch (e) {
    const error = ConnectError.from(e);
    if (error.code !== Code.InvalidArgument) throw error;
    // The google.rpc.Status of the grpc-status-details-bin trailer, decoded by Connect.
    console.log(`rejected: ${codeName(error.code)} ${error.rawMessage}`);
    for (const badRequest of error.findDetails(BadRequestSchema)) {
      for (const v of badRequest.fieldViolations) console.log(`  field ${v.field}: ${v.description}`);
    }
    return;
  }
  throw new Error("an order of 0 books was accepted");
}

async function cancel(orderId: string): Promise<void> {
  const reply = await orders.cancelOrder(
    { requestId: `cancel-${runId}`, orderId, reason: "changed my mind" },
    { timeoutMs: TIMEOUT_MS },
  );
  console.log(`cancelled: ${reply.order?.orderId} ${stateName(reply.order?.state ?? OrderState.UNSPECIFIED)}`);
}

try {
  const user = await signUp();
  token = userToken(user.userId);
  const placed = await order(user.userId);
  const final = await watch(placed.orderId);
  if (final !== OrderState.PAID) {
    console.error(`the order ended ${stateName(final)}, not PAID`);
    process.exit(1);
  }
  await invalidOrder(user.userId);
  await cancel(placed.orderId);
} catch (e) {
  if (!(e instanceof ConnectError)) throw e;
  const hint = e.code === Code.Unauthenticated ? " (the edge wants a token: set SHOP_TOKEN)" : "";
  console.error(`error: ${codeName(e.code)} ${e.rawMessage}${hint}`);
  process.exit(1);
}
