/*
 * loadgen.c -- single-threaded epoll load generator for cppnp's echo benchmarks.
 *
 * Opens --conns non-blocking TCP connections to a loopback echo server and keeps
 * --depth messages of --size bytes in flight on each (ping-pong is depth 1).
 * Every message carries a pattern derived from (connection id, message sequence
 * number); the echoed bytes are compared with what was sent, so a server that
 * drops, duplicates, reorders or mixes up data is caught.  Round-trip latency
 * (first byte written -> last byte echoed) goes into a log-linear histogram with
 * 128 linear buckets per power of two of nanoseconds (< 0.8 % relative error,
 * up to ~18 minutes).
 *
 * Timeline: connect, --warmup seconds (not counted), --duration seconds
 * (counted).  "# window-start" and "# window-end" are printed on stdout at the
 * edges of the counted window so a harness can sample the server's CPU time
 * there.  At the end ONE JSON line is printed on stdout.  Diagnostics go to
 * stderr.
 *
 * A connection whose oldest unanswered message is more than 1 s old at the end
 * counts as "stalled" (the server lost or withheld data).
 *
 * Exit status: 0 ok, 1 echo mismatch, 2 every connection failed, 3 hard
 * timeout (warmup + duration + 10 s), 64 usage error.
 *
 * Build: gcc -O2 -Wall -Werror -o loadgen loadgen.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

/* ---- histogram ------------------------------------------------------------ */

#define SUB_BITS 7                        /* 2^SUB_BITS linear buckets per octave */
#define SUB_COUNT (1u << (SUB_BITS + 1))  /* exact below this value */
#define MAX_VALUE_NS (1ull << 40)         /* clamp: ~1100 s */
#define N_BUCKETS ((40 - SUB_BITS + 1) * (1u << SUB_BITS) + SUB_COUNT)

static uint64_t hist[N_BUCKETS];
static uint64_t hist_total;
static uint64_t hist_max_ns;
static double hist_sum_ns;

static unsigned bucket_of(uint64_t v)
{
    if (v >= MAX_VALUE_NS)
        v = MAX_VALUE_NS - 1;
    if (v < SUB_COUNT)
        return (unsigned)v;
    unsigned msb = 63u - (unsigned)__builtin_clzll(v);
    unsigned shift = msb - SUB_BITS;               /* v >> shift in [128, 256) */
    return shift * (1u << SUB_BITS) + (unsigned)(v >> shift);
}

static double bucket_mid_ns(unsigned b)
{
    if (b < SUB_COUNT)
        return (double)b;
    unsigned shift = b / (1u << SUB_BITS) - 1u;
    uint64_t top = (uint64_t)(b - shift * (1u << SUB_BITS));
    uint64_t lo = top << shift;
    return (double)lo + ((double)(1ull << shift) - 1.0) / 2.0;
}

static void hist_record(uint64_t ns)
{
    hist[bucket_of(ns)]++;
    hist_total++;
    hist_sum_ns += (double)ns;
    if (ns > hist_max_ns)
        hist_max_ns = ns;
}

static double hist_quantile_us(double q)
{
    if (hist_total == 0)
        return 0.0;
    uint64_t rank = (uint64_t)(q * (double)hist_total + 0.999999);
    if (rank < 1)
        rank = 1;
    uint64_t seen = 0;
    for (unsigned b = 0; b < N_BUCKETS; b++) {
        seen += hist[b];
        if (seen >= rank) {
            double v = bucket_mid_ns(b);
            return (v > (double)hist_max_ns ? (double)hist_max_ns : v) / 1000.0;
        }
    }
    return (double)hist_max_ns / 1000.0;
}

/* ---- connections ---------------------------------------------------------- */

enum { ST_CONNECTING, ST_ACTIVE, ST_DEAD };

struct conn {
    int fd;
    int state;
    uint32_t id;
    int want_out;          /* EPOLLOUT currently registered */
    uint64_t send_seq;     /* messages fully written */
    size_t send_off;       /* bytes of message send_seq written so far */
    uint64_t recv_seq;     /* messages fully echoed */
    size_t recv_off;       /* bytes of message recv_seq echoed so far */
    unsigned char *ring;   /* depth slots of size bytes: message seq -> slot seq % depth */
    uint64_t *sent_ns;     /* per slot: when the first byte was written */
};

static struct conn *conns;
static int n_conns = 1;
static size_t msg_size = 64;
static int depth = 1;
static double duration_s = 5.0;
static double warmup_s = 1.0;
static const char *host = "127.0.0.1";
static int port = -1;
static const char *mode = "pingpong";

static int epfd;
static unsigned char rbuf[256 * 1024];

static uint64_t win_start_ns, win_end_ns;
static int in_window;
static uint64_t round_trips;
static uint64_t bytes_echoed;
static uint64_t errors;
static uint64_t connect_errors;
static uint64_t mismatches;
static int connected;
static int alive;
static int mismatch_reports;

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static uint64_t splitmix64(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

/* Fill message `seq` of connection `id`: 64-bit words base, base+1, ... */
static void fill_message(unsigned char *p, uint32_t id, uint64_t seq)
{
    uint64_t base = splitmix64(((uint64_t)id << 40) ^ seq);
    size_t words = msg_size / 8, i;
    for (i = 0; i < words; i++) {
        uint64_t w = base + i;
        memcpy(p + i * 8, &w, 8);
    }
    uint64_t w = base + words;
    for (i = words * 8; i < msg_size; i++) {
        p[i] = (unsigned char)(w & 0xff);
        w >>= 8;
    }
}

static void set_events(struct conn *c, int want_out)
{
    struct epoll_event ev = {0};
    if (c->want_out == want_out)
        return;
    ev.events = EPOLLIN | (want_out ? EPOLLOUT : 0);
    ev.data.ptr = c;
    if (epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev) == 0)
        c->want_out = want_out;
}

static void kill_conn(struct conn *c)
{
    if (c->state == ST_DEAD)
        return;
    if (c->state == ST_ACTIVE)
        alive--;
    c->state = ST_DEAD;
    epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    c->fd = -1;
}

static void conn_error(struct conn *c, const char *what, int err)
{
    errors++;
    if (errors <= 5)
        fprintf(stderr, "loadgen: conn %u: %s: %s\n", c->id, what,
                err ? strerror(err) : "closed by peer");
    kill_conn(c);
}

/* Write as much as the socket takes while fewer than `depth` messages are in flight. */
static void pump_send(struct conn *c, uint64_t now)
{
    for (;;) {
        if (c->send_off == 0 && c->send_seq - c->recv_seq >= (uint64_t)depth)
            break;
        unsigned slot = (unsigned)(c->send_seq % (uint64_t)depth);
        unsigned char *msg = c->ring + (size_t)slot * msg_size;
        if (c->send_off == 0) {
            fill_message(msg, c->id, c->send_seq);
            c->sent_ns[slot] = now;
        }
        ssize_t n = send(c->fd, msg + c->send_off, msg_size - c->send_off, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                set_events(c, 1);
                return;
            }
            if (errno == EINTR)
                continue;
            conn_error(c, "send", errno);
            return;
        }
        c->send_off += (size_t)n;
        if (c->send_off == msg_size) {
            c->send_off = 0;
            c->send_seq++;
        }
    }
    set_events(c, 0);
}

static void report_mismatch(struct conn *c, const unsigned char *got, size_t n)
{
    mismatches++;
    if (mismatch_reports++ < 5) {
        unsigned slot = (unsigned)(c->recv_seq % (uint64_t)depth);
        const unsigned char *want = c->ring + (size_t)slot * msg_size + c->recv_off;
        size_t i = 0;
        while (i < n && got[i] == want[i])
            i++;
        fprintf(stderr,
                "loadgen: MISMATCH conn %u message %llu offset %zu: expected 0x%02x got 0x%02x\n",
                c->id, (unsigned long long)c->recv_seq, c->recv_off + i, want[i], got[i]);
    }
    kill_conn(c);
}

static void on_readable(struct conn *c)
{
    ssize_t n = recv(c->fd, rbuf, sizeof rbuf, 0);
    if (n <= 0) {
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
            return;
        conn_error(c, "recv", n < 0 ? errno : 0);
        return;
    }
    uint64_t now = now_ns();
    /* The server may only echo what was sent. */
    uint64_t sent = c->send_seq * msg_size + c->send_off;
    uint64_t got = c->recv_seq * msg_size + c->recv_off + (uint64_t)n;
    if (got > sent) {
        mismatches++;
        if (mismatch_reports++ < 5)
            fprintf(stderr, "loadgen: MISMATCH conn %u: %llu bytes echoed, only %llu sent\n",
                    c->id, (unsigned long long)got, (unsigned long long)sent);
        kill_conn(c);
        return;
    }
    size_t p = 0;
    while (p < (size_t)n) {
        unsigned slot = (unsigned)(c->recv_seq % (uint64_t)depth);
        const unsigned char *want = c->ring + (size_t)slot * msg_size + c->recv_off;
        size_t k = msg_size - c->recv_off;
        if (k > (size_t)n - p)
            k = (size_t)n - p;
        if (memcmp(rbuf + p, want, k) != 0) {
            report_mismatch(c, rbuf + p, k);
            return;
        }
        p += k;
        c->recv_off += k;
        if (c->recv_off == msg_size) {
            if (in_window && now >= win_start_ns && now < win_end_ns) {
                hist_record(now - c->sent_ns[slot]);
                round_trips++;
                bytes_echoed += msg_size;
            }
            c->recv_off = 0;
            c->recv_seq++;
        }
    }
    pump_send(c, now);
}

static void on_connected(struct conn *c)
{
    int err = 0;
    socklen_t len = sizeof err;
    if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
        err = errno;
    if (err) {
        connect_errors++;
        conn_error(c, "connect", err);
        return;
    }
    c->state = ST_ACTIVE;
    connected++;
    alive++;
    pump_send(c, now_ns());
}

static void on_alarm(int sig)
{
    (void)sig;
    static const char msg[] = "loadgen: hard timeout, exiting\n";
    ssize_t r = write(2, msg, sizeof msg - 1);
    (void)r;
    _exit(3);
}

static void usage(void)
{
    fprintf(stderr,
            "usage: loadgen --port P [--host 127.0.0.1|::1] [--conns N] [--size BYTES]\n"
            "               [--duration S] [--warmup S] [--mode pingpong|pipeline] [--depth D]\n");
    exit(64);
}

static void raise_nofile(rlim_t want)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) != 0 || rl.rlim_cur >= want)
        return;
    rl.rlim_cur = want < rl.rlim_max ? want : rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
}

static void print_marker(const char *what)
{
    printf("# %s\n", what);
    fflush(stdout);
}

int main(int argc, char **argv)
{
    static const struct option opts[] = {
        {"host", required_argument, 0, 'h'},   {"port", required_argument, 0, 'p'},
        {"conns", required_argument, 0, 'c'},  {"size", required_argument, 0, 's'},
        {"duration", required_argument, 0, 'd'}, {"warmup", required_argument, 0, 'w'},
        {"mode", required_argument, 0, 'm'},   {"depth", required_argument, 0, 'D'},
        {0, 0, 0, 0},
    };
    int opt, depth_given = 0;
    char *end;
    while ((opt = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (opt) {
        case 'h': host = optarg; break;
        case 'p': port = (int)strtol(optarg, &end, 10); if (*end) usage(); break;
        case 'c': n_conns = (int)strtol(optarg, &end, 10); if (*end) usage(); break;
        case 's': msg_size = (size_t)strtoull(optarg, &end, 10); if (*end) usage(); break;
        case 'd': duration_s = strtod(optarg, &end); if (*end) usage(); break;
        case 'w': warmup_s = strtod(optarg, &end); if (*end) usage(); break;
        case 'm': mode = optarg; break;
        case 'D': depth = (int)strtol(optarg, &end, 10); if (*end) usage(); depth_given = 1; break;
        default: usage();
        }
    }
    if (optind != argc || port <= 0 || port > 65535 || n_conns < 1 || n_conns > 1000000 ||
        msg_size < 1 || msg_size > (64u << 20) || duration_s <= 0 || duration_s > 3600 ||
        warmup_s < 0 || warmup_s > 3600 || depth < 1 || depth > 65536)
        usage();
    if (strcmp(mode, "pingpong") == 0) {
        if (depth_given && depth != 1) {
            fprintf(stderr, "loadgen: --depth only applies to --mode pipeline\n");
            exit(64);
        }
        depth = 1;
    } else if (strcmp(mode, "pipeline") != 0) {
        usage();
    }
    if ((double)n_conns * (double)depth * (double)msg_size > 2e9) {
        fprintf(stderr, "loadgen: conns * depth * size exceeds 2 GB of buffers\n");
        exit(64);
    }

    /* Loopback targets only. */
    struct sockaddr_storage addr;
    socklen_t addrlen;
    memset(&addr, 0, sizeof addr);
    if (strcmp(host, "127.0.0.1") == 0) {
        struct sockaddr_in *a = (struct sockaddr_in *)&addr;
        a->sin_family = AF_INET;
        a->sin_port = htons((uint16_t)port);
        inet_pton(AF_INET, host, &a->sin_addr);
        addrlen = sizeof *a;
    } else if (strcmp(host, "::1") == 0) {
        struct sockaddr_in6 *a = (struct sockaddr_in6 *)&addr;
        a->sin6_family = AF_INET6;
        a->sin6_port = htons((uint16_t)port);
        inet_pton(AF_INET6, host, &a->sin6_addr);
        addrlen = sizeof *a;
    } else {
        fprintf(stderr, "loadgen: only 127.0.0.1 and ::1 are allowed as --host\n");
        exit(64);
    }

    signal(SIGPIPE, SIG_IGN);
    signal(SIGALRM, on_alarm);
    alarm((unsigned)(warmup_s + duration_s + 10.0 + 0.999));
    raise_nofile((rlim_t)n_conns + 64);

    epfd = epoll_create1(EPOLL_CLOEXEC);
    if (epfd < 0) {
        perror("loadgen: epoll_create1");
        return 2;
    }
    conns = calloc((size_t)n_conns, sizeof *conns);
    if (!conns) {
        perror("loadgen: calloc");
        return 2;
    }

    uint64_t t0 = now_ns();
    for (int i = 0; i < n_conns; i++) {
        struct conn *c = &conns[i];
        c->id = (uint32_t)i;
        c->state = ST_DEAD;
        c->fd = -1;
        c->ring = malloc((size_t)depth * msg_size);
        c->sent_ns = calloc((size_t)depth, sizeof *c->sent_ns);
        if (!c->ring || !c->sent_ns) {
            perror("loadgen: malloc");
            return 2;
        }
        int fd = socket(addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0) {
            connect_errors++;
            errors++;
            if (errors <= 5)
                fprintf(stderr, "loadgen: socket: %s\n", strerror(errno));
            continue;
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        c->fd = fd;
        c->state = ST_CONNECTING;
        struct epoll_event ev = {.events = EPOLLOUT, .data.ptr = c};
        c->want_out = -1;  /* connect-only interest: the first set_events() always applies */
        epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev);
        if (connect(fd, (struct sockaddr *)&addr, addrlen) < 0 && errno != EINPROGRESS) {
            connect_errors++;
            conn_error(c, "connect", errno);
        }
    }

    win_start_ns = t0 + (uint64_t)(warmup_s * 1e9);
    win_end_ns = win_start_ns + (uint64_t)(duration_s * 1e9);
    int started = 0;
    struct epoll_event events[512];
    for (;;) {
        uint64_t now = now_ns();
        if (!started && now >= win_start_ns) {
            started = 1;
            in_window = 1;
            print_marker("window-start");
        }
        if (now >= win_end_ns) {
            in_window = 0;
            print_marker("window-end");
            break;
        }
        uint64_t next = started ? win_end_ns : win_start_ns;
        int timeout_ms = (int)((next - now + 999999) / 1000000);
        int n = epoll_wait(epfd, events, 512, timeout_ms);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            perror("loadgen: epoll_wait");
            return 2;
        }
        for (int i = 0; i < n; i++) {
            struct conn *c = events[i].data.ptr;
            uint32_t ev = events[i].events;
            if (c->state == ST_CONNECTING) {
                if (ev & (EPOLLOUT | EPOLLERR | EPOLLHUP))
                    on_connected(c);
                continue;
            }
            if (c->state != ST_ACTIVE)
                continue;
            if (ev & (EPOLLIN | EPOLLHUP | EPOLLERR))
                on_readable(c);
            if (c->state == ST_ACTIVE && (ev & EPOLLOUT))
                pump_send(c, now_ns());
        }
    }

    double window = (double)(win_end_ns - win_start_ns) / 1e9;
    /* A connection whose oldest unanswered message is over a second old has most
     * likely lost data in the server (a silent stall, not a mismatch). */
    uint64_t end_ns = now_ns();
    int stalled = 0;
    for (int i = 0; i < n_conns; i++) {
        struct conn *c = &conns[i];
        uint64_t sent_total = c->send_seq * msg_size + c->send_off;
        uint64_t got_total = c->recv_seq * msg_size + c->recv_off;
        if (c->state == ST_ACTIVE && got_total < sent_total &&
            end_ns - c->sent_ns[c->recv_seq % (uint64_t)depth] > 1000000000ull) {
            stalled++;
            if (stalled <= 5)
                fprintf(stderr, "loadgen: conn %u stalled: %llu bytes sent, %llu echoed\n",
                        c->id, (unsigned long long)sent_total, (unsigned long long)got_total);
        }
    }
    for (int i = 0; i < n_conns; i++) {
        if (conns[i].state == ST_CONNECTING)
            connect_errors++, errors++;
        if (conns[i].fd >= 0)
            close(conns[i].fd);
    }
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    double client_cpu = (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6 +
                        (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6;
    double elapsed = (double)(now_ns() - t0) / 1e9;
    printf("{\"rt_per_s\": %.1f, \"mb_per_s\": %.3f, \"p50_us\": %.1f, \"p90_us\": %.1f, "
           "\"p99_us\": %.1f, \"p999_us\": %.1f, \"max_us\": %.1f, \"mean_us\": %.1f, "
           "\"round_trips\": %llu, \"errors\": %llu, \"connect_errors\": %llu, "
           "\"mismatches\": %llu, \"stalled\": %d, \"conns\": %d, \"connected\": %d, "
           "\"alive_at_end\": %d, "
           "\"size\": %zu, \"mode\": \"%s\", \"depth\": %d, \"window_s\": %.3f, "
           "\"warmup_s\": %.3f, \"client_cpu_pct\": %.1f}\n",
           (double)round_trips / window, (double)bytes_echoed / window / 1e6,
           hist_quantile_us(0.50), hist_quantile_us(0.90), hist_quantile_us(0.99),
           hist_quantile_us(0.999), (double)hist_max_ns / 1000.0,
           hist_total ? hist_sum_ns / (double)hist_total / 1000.0 : 0.0,
           (unsigned long long)round_trips, (unsigned long long)errors,
           (unsigned long long)connect_errors, (unsigned long long)mismatches, stalled, n_conns,
           connected, alive, msg_size, mode, depth, window, warmup_s,
           elapsed > 0 ? 100.0 * client_cpu / elapsed : 0.0);
    fflush(stdout);
    if (mismatches)
        return 1;
    if (connected == 0)
        return 2;
    return 0;
}
