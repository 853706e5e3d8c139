/* A C guest client over a virtio-serial port (or any fd): the sketch in docs/guest.md,
 * made whole so the tests can compile and run it.
 *
 * Usage: guest_c_client PORT-PATH ADDRESS COUNT
 * Opens PORT-PATH, drains stale bytes (the stale-bytes rule, with its header retry), then
 * drives proton-c's pn_connection_driver over the fd with poll(): sends COUNT messages
 * at-least-once to ADDRESS and exits 0 once all are accepted (1 on any failure, with a
 * reason on stderr).
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <proton/codec.h>
#include <proton/connection.h>
#include <proton/connection_driver.h>
#include <proton/delivery.h>
#include <proton/event.h>
#include <proton/link.h>
#include <proton/message.h>
#include <proton/session.h>
#include <proton/terminus.h>
#include <proton/transport.h>

#define DRAIN_QUIET_MS 100 /* quiet time that ends the drain (docs/guest.md) */
#define DRAIN_LIMIT_MS 2000 /* give up draining a host that never stops writing */
#define IDLE_TIMEOUT_MS 16000 /* the only way to notice a vanished pty host side */
/* The host answers a protocol header at once. Silence after ours, or bytes that are not a
 * header, mean it went into what an earlier client left half written: drain and send it
 * again, at most HEADER_RETRIES times (docs/guest.md). */
#define ANSWER_TIMEOUT_MS 1000
#define HEADER_RETRIES 2

static pn_millis_t now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (pn_millis_t)(ts.tv_sec * 1000 + ts.tv_nsec / 1000000);
}

/* The stale-bytes rule: discard what arrives before our protocol header goes out. */
static size_t drain(int fd) {
    char buf[65536];
    size_t discarded = 0;
    pn_millis_t end = now_ms() + DRAIN_LIMIT_MS;
    for (;;) {
        struct pollfd p = {fd, POLLIN, 0};
        if (now_ms() >= end || poll(&p, 1, DRAIN_QUIET_MS) <= 0) return discarded;
        ssize_t n = read(fd, buf, sizeof buf);
        if (n <= 0) return discarded; /* end of stream (or EIO on a pty) counts as quiet */
        discarded += (size_t)n;
    }
}

struct app {
    const char *address;
    int total, sent, accepted, failed;
};

static void send_message(pn_link_t *sender, int n) {
    char tag[16], body[32];
    snprintf(tag, sizeof tag, "%d", n);
    snprintf(body, sizeof body, "c%d", n);
    pn_message_t *m = pn_message();
    pn_data_put_string(pn_message_body(m), pn_bytes(strlen(body), body));
    pn_rwbytes_t buf = {0, NULL};
    pn_delivery(sender, pn_dtag(tag, strlen(tag)));
    pn_message_send(m, sender, &buf);
    free(buf.start);
    pn_message_free(m);
}

static void handle(struct app *a, pn_event_t *e) {
    switch (pn_event_type(e)) {
    case PN_CONNECTION_INIT: {
        pn_connection_t *c = pn_event_connection(e);
        pn_connection_set_container(c, "c-guest");
        pn_connection_open(c);
        pn_session_t *s = pn_session(c);
        pn_session_open(s);
        pn_link_t *l = pn_sender(s, "c-sender");
        pn_terminus_set_address(pn_link_target(l), a->address);
        pn_link_open(l);
        break;
    }
    case PN_LINK_FLOW: {
        pn_link_t *l = pn_event_link(e);
        while (pn_link_is_sender(l) && pn_link_credit(l) > 0 && a->sent < a->total)
            send_message(l, a->sent++);
        break;
    }
    case PN_DELIVERY: {
        pn_delivery_t *d = pn_event_delivery(e);
        if (pn_delivery_remote_state(d) == PN_ACCEPTED) a->accepted++;
        else if (pn_delivery_remote_state(d)) a->failed++;
        pn_delivery_settle(d);
        if (a->accepted + a->failed == a->total) pn_connection_close(pn_event_connection(e));
        break;
    }
    case PN_TRANSPORT_ERROR: {
        pn_condition_t *c = pn_transport_condition(pn_event_transport(e));
        fprintf(stderr, "transport error: %s: %s\n", pn_condition_get_name(c),
                pn_condition_get_description(c));
        break;
    }
    default:
        break;
    }
}

/* Drain the port (the stale-bytes rule), then a new connection driver: our header next. */
static void start(pn_connection_driver_t *d, int fd) {
    fprintf(stderr, "discarded %zu stale bytes\n", drain(fd));
    if (pn_connection_driver_init(d, NULL, NULL) != 0) exit(1);
    pn_transport_set_idle_timeout(d->transport, IDLE_TIMEOUT_MS);
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s PORT-PATH ADDRESS COUNT\n", argv[0]);
        return 2;
    }
    struct app a = {argv[2], atoi(argv[3]), 0, 0, 0};
    int fd = open(argv[1], O_RDWR | O_NONBLOCK | O_NOCTTY);
    if (fd < 0) {
        perror(argv[1]);
        return 1;
    }
    pn_connection_driver_t d;
    start(&d, fd);
    int retries = 0;
    size_t got = 0;          /* bytes read since this attempt's header went out */
    pn_millis_t sent_at = 0; /* when this attempt's header went out; 0: not yet */
    const char *again = NULL;

    while (!pn_connection_driver_finished(&d)) {
        if (again) { /* nothing has been sent or received on this attempt but a header */
            fprintf(stderr, "%s; sending our protocol header again\n", again);
            pn_connection_driver_destroy(&d);
            start(&d, fd);
            retries++;
            got = 0;
            sent_at = 0;
            again = NULL;
        }
        pn_event_t *e;
        while ((e = pn_connection_driver_next_event(&d))) handle(&a, e);
        pn_rwbytes_t rb = pn_connection_driver_read_buffer(&d);
        pn_bytes_t wb = pn_connection_driver_write_buffer(&d);
        if (pn_connection_driver_read_closed(&d) && !wb.size) {
            pn_connection_driver_write_close(&d); /* peer's close read, ours written */
            continue;
        }
        struct pollfd p = {fd, (short)((rb.size ? POLLIN : 0) | (wb.size ? POLLOUT : 0)), 0};
        pn_timestamp_t now = now_ms();
        pn_timestamp_t next = pn_transport_tick(d.transport, now); /* heartbeats, timeouts */
        int answering = sent_at && !got && retries < HEADER_RETRIES;
        if (answering && now >= sent_at + ANSWER_TIMEOUT_MS) {
            again = "no answer to our protocol header";
            continue;
        }
        if (answering && (!next || next > sent_at + ANSWER_TIMEOUT_MS))
            next = sent_at + ANSWER_TIMEOUT_MS;
        int wait = next ? (int)(next > now ? next - now : 0) : -1;
        if (poll(&p, 1, wait) < 0 && errno != EINTR) break;
        if (p.revents & POLLIN) {
            ssize_t n = read(fd, rb.start, rb.size);
            if (n > 0) {
                for (size_t i = 0; got + i < 4 && i < (size_t)n; i++)
                    if (rb.start[i] != "AMQP"[got + i] && retries < HEADER_RETRIES)
                        again = "stale bytes instead of a protocol header";
                if (again) continue;
                got += (size_t)n;
                pn_connection_driver_read_done(&d, (size_t)n);
            } else if (n == 0 || errno == EIO)
                pn_connection_driver_read_close(&d);
        }
        if (p.revents & POLLOUT) {
            ssize_t n = write(fd, wb.start, wb.size);
            if (n > 0) {
                if (!sent_at) sent_at = now_ms();
                pn_connection_driver_write_done(&d, (size_t)n);
            }
        }
        if ((p.revents & (POLLHUP | POLLERR)) && !(p.revents & POLLIN))
            pn_connection_driver_close(&d); /* host side gone: a real app reopens */
    }
    pn_connection_driver_destroy(&d);
    close(fd);
    printf("accepted %d of %d\n", a.accepted, a.total);
    return a.accepted == a.total ? 0 : 1;
}
