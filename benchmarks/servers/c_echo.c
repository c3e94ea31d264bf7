/*
 * c_echo.c -- single-threaded epoll echo server: the speed ceiling for the benchmarks.
 *
 * Level-triggered epoll.  Each readable connection is read into one shared 64 KiB
 * buffer and written straight back; whatever the socket does not take is kept in
 * a per-connection pending buffer, and the connection stops reading (EPOLLOUT
 * only) until that buffer has drained.  TCP_NODELAY is set on accepted sockets,
 * as asyncio and uvloop do by default.
 *
 * usage: c_echo --host 127.0.0.1|::1 --port P    (port 0 = pick a free one)
 * Prints "listening on HOST:PORT" (flushed) when ready; exits on SIGINT/SIGTERM.
 *
 * Build: gcc -O2 -Wall -Werror -o c_echo c_echo.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <getopt.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <unistd.h>

struct pending {
    char *buf;
    size_t len;  /* bytes not yet written, starting at buf + off */
    size_t off;
    size_t cap;
};

static struct pending *pend;  /* indexed by fd */
static size_t pend_cap;
static int epfd;
static char rbuf[64 * 1024];

static void die(const char *what)
{
    perror(what);
    exit(1);
}

static struct pending *pending_for(int fd)
{
    if ((size_t)fd >= pend_cap) {
        size_t cap = pend_cap ? pend_cap : 1024;
        while (cap <= (size_t)fd)
            cap *= 2;
        struct pending *p = realloc(pend, cap * sizeof *p);
        if (!p)
            die("c_echo: realloc");
        memset(p + pend_cap, 0, (cap - pend_cap) * sizeof *p);
        pend = p;
        pend_cap = cap;
    }
    return &pend[fd];
}

static void close_conn(int fd)
{
    struct pending *p = pending_for(fd);
    free(p->buf);
    memset(p, 0, sizeof *p);
    epoll_ctl(epfd, EPOLL_CTL_DEL, fd, NULL);
    close(fd);
}

static void watch(int fd, unsigned events, int op)
{
    struct epoll_event ev = {.events = events, .data.fd = fd};
    if (epoll_ctl(epfd, op, fd, &ev) < 0 && op == EPOLL_CTL_ADD)
        close(fd);
}

static void on_writable(int fd)
{
    struct pending *p = pending_for(fd);
    while (p->len > 0) {
        ssize_t n = send(fd, p->buf + p->off, p->len, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return;
            close_conn(fd);
            return;
        }
        p->off += (size_t)n;
        p->len -= (size_t)n;
    }
    p->off = 0;
    watch(fd, EPOLLIN, EPOLL_CTL_MOD);  /* drained: read again */
}

static void on_readable(int fd)
{
    ssize_t n = recv(fd, rbuf, sizeof rbuf, 0);
    if (n <= 0) {
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
            return;
        close_conn(fd);
        return;
    }
    ssize_t w = send(fd, rbuf, (size_t)n, MSG_NOSIGNAL);
    if (w < 0) {
        if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
            close_conn(fd);
            return;
        }
        w = 0;
    }
    if (w == n)
        return;
    struct pending *p = pending_for(fd);
    size_t rest = (size_t)(n - w);
    if (p->cap < rest) {
        char *b = realloc(p->buf, rest);
        if (!b)
            die("c_echo: realloc");
        p->buf = b;
        p->cap = rest;
    }
    memcpy(p->buf, rbuf + w, rest);
    p->off = 0;
    p->len = rest;
    watch(fd, EPOLLOUT, EPOLL_CTL_MOD);  /* stop reading until the backlog is written */
}

static void on_accept(int lfd)
{
    for (;;) {
        int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK)
                perror("c_echo: accept4");
            return;
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        pending_for(fd);
        watch(fd, EPOLLIN, EPOLL_CTL_ADD);
    }
}

int main(int argc, char **argv)
{
    static const struct option opts[] = {
        {"host", required_argument, 0, 'h'},
        {"port", required_argument, 0, 'p'},
        {0, 0, 0, 0},
    };
    const char *host = "127.0.0.1";
    int port = 0, opt;
    char *end;
    while ((opt = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (opt) {
        case 'h': host = optarg; break;
        case 'p':
            port = (int)strtol(optarg, &end, 10);
            if (*end || port < 0 || port > 65535) {
                fprintf(stderr, "c_echo: bad --port\n");
                return 64;
            }
            break;
        default:
            fprintf(stderr, "usage: c_echo --host 127.0.0.1|::1 --port P\n");
            return 64;
        }
    }

    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }

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
        fprintf(stderr, "c_echo: only 127.0.0.1 and ::1 are allowed as --host\n");
        return 64;
    }

    int lfd = socket(addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (lfd < 0)
        die("c_echo: socket");
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(lfd, (struct sockaddr *)&addr, addrlen) < 0)
        die("c_echo: bind");
    if (listen(lfd, SOMAXCONN) < 0)
        die("c_echo: listen");
    getsockname(lfd, (struct sockaddr *)&addr, &addrlen);
    int real_port = addr.ss_family == AF_INET
                        ? ntohs(((struct sockaddr_in *)&addr)->sin_port)
                        : ntohs(((struct sockaddr_in6 *)&addr)->sin6_port);

    /* A shell may start background jobs with SIGINT ignored; an ignored signal
     * never becomes pending, so signalfd would not see it. */
    signal(SIGINT, SIG_DFL);
    signal(SIGTERM, SIG_DFL);
    sigset_t mask;
    sigemptyset(&mask);
    sigaddset(&mask, SIGINT);
    sigaddset(&mask, SIGTERM);
    sigprocmask(SIG_BLOCK, &mask, NULL);
    int sfd = signalfd(-1, &mask, SFD_NONBLOCK | SFD_CLOEXEC);
    if (sfd < 0)
        die("c_echo: signalfd");
    signal(SIGPIPE, SIG_IGN);

    epfd = epoll_create1(EPOLL_CLOEXEC);
    if (epfd < 0)
        die("c_echo: epoll_create1");
    watch(lfd, EPOLLIN, EPOLL_CTL_ADD);
    watch(sfd, EPOLLIN, EPOLL_CTL_ADD);

    printf("listening on %s:%d\n", host, real_port);
    fflush(stdout);

    struct epoll_event events[256];
    for (;;) {
        int n = epoll_wait(epfd, events, 256, -1);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            die("c_echo: epoll_wait");
        }
        for (int i = 0; i < n; i++) {
            int fd = events[i].data.fd;
            unsigned ev = events[i].events;
            if (fd == sfd)
                return 0;
            if (fd == lfd) {
                on_accept(lfd);
                continue;
            }
            if (ev & EPOLLERR) {
                close_conn(fd);
                continue;
            }
            if (ev & EPOLLOUT) {
                on_writable(fd);
                continue;
            }
            if (ev & (EPOLLIN | EPOLLHUP))
                on_readable(fd);
        }
    }
}
