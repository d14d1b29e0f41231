/*
 * connrate: new-TCP-connection rate, for scripts/bench_packets.
 *
 * The benchmark measures what a firewall costs per *new* connection, so each
 * connection must be as cheap as possible everywhere else: the client connects
 * and closes at once with SO_LINGER {1, 0} (an RST, so neither side keeps a
 * TIME_WAIT socket and ephemeral ports never run out), and the server accepts
 * and closes the same way.  Python would be the bottleneck; this is C.
 *
 *   connrate server IP PORT[,PORT...] THREADS
 *       Listen on every PORT; THREADS threads per port block in accept() and
 *       close each connection immediately.  Runs until killed.  Prints
 *       "ready" on stdout once every port listens.
 *
 *   connrate client IP PORT THREADS SECONDS [CONNECT_TIMEOUT_MS]
 *       THREADS threads loop socket/connect/close for SECONDS seconds and
 *       print one JSON line: {"ok": N, "refused": N, "timeout": N,
 *       "other": N, "seconds": S, "rate": N/S}.  A connect() that gets no
 *       answer (a dropped SYN) gives up after CONNECT_TIMEOUT_MS (default
 *       200) and counts as a timeout, so a denied port is told apart from a
 *       closed one (refused).  "other" is any other error; a handful per
 *       100,000 are ECONNRESET, when a 4-tuple is reused while the previous
 *       connection's RST is still in flight.
 *
 * Build: gcc -O2 -pthread -o connrate connrate.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_THREADS 256
#define MAX_PORTS 16

static struct sockaddr_in target;
static double deadline;
static int connect_timeout_ms = 200;

struct counts {
    unsigned long ok, refused, timeout, other;
};

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what)
{
    perror(what);
    exit(2);
}

static void rst_on_close(int fd)
{
    struct linger lg = {.l_onoff = 1, .l_linger = 0};
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
}

static int parse_int(const char *s, int lo, int hi, const char *what)
{
    char *end;
    long v = strtol(s, &end, 10);
    if (*s == '\0' || *end != '\0' || v < lo || v > hi) {
        fprintf(stderr, "connrate: bad %s %s (want %d..%d)\n", what, s, lo, hi);
        exit(2);
    }
    return (int)v;
}

/* ------------------------------------------------------------------ server */

static void *accept_loop(void *arg)
{
    int lfd = (int)(long)arg;
    for (;;) {
        int fd = accept(lfd, NULL, NULL);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED || errno == EMFILE || errno == ENFILE)
                continue;
            die("accept");
        }
        rst_on_close(fd);
        close(fd);
    }
    return NULL;
}

static int server(const char *ip, char *ports, int threads)
{
    int lfds[MAX_PORTS], nports = 0;
    for (char *save = NULL, *p = strtok_r(ports, ",", &save); p; p = strtok_r(NULL, ",", &save)) {
        if (nports == MAX_PORTS) {
            fprintf(stderr, "connrate: at most %d ports\n", MAX_PORTS);
            return 2;
        }
        struct sockaddr_in addr = {.sin_family = AF_INET};
        addr.sin_port = htons(parse_int(p, 1, 65535, "port"));
        if (inet_pton(AF_INET, ip, &addr.sin_addr) != 1) {
            fprintf(stderr, "connrate: bad IPv4 address %s\n", ip);
            return 2;
        }
        int fd = socket(AF_INET, SOCK_STREAM, 0), one = 1;
        if (fd < 0)
            die("socket");
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
        if (bind(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0)
            die("bind");
        if (listen(fd, 4096) < 0)
            die("listen");
        lfds[nports++] = fd;
    }
    for (int i = 0; i < nports; i++)
        for (int t = 0; t < threads; t++) {
            pthread_t th;
            if (pthread_create(&th, NULL, accept_loop, (void *)(long)lfds[i]) != 0)
                die("pthread_create");
        }
    printf("ready\n");
    fflush(stdout);
    for (;;)
        pause();
    return 0;
}

/* ------------------------------------------------------------------ client */

static void *connect_loop(void *arg)
{
    struct counts *c = arg;
    struct timeval tv = {.tv_sec = connect_timeout_ms / 1000,
                         .tv_usec = (connect_timeout_ms % 1000) * 1000};
    while (now() < deadline) {
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        if (fd < 0) {
            c->other++;
            continue;
        }
        rst_on_close(fd);
        /* connect() honours SO_SNDTIMEO: a dropped SYN fails with EINPROGRESS. */
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
        if (connect(fd, (struct sockaddr *)&target, sizeof(target)) == 0)
            c->ok++;
        else if (errno == ECONNREFUSED)
            c->refused++;
        else if (errno == EINPROGRESS || errno == ETIMEDOUT || errno == EAGAIN)
            c->timeout++;
        else
            c->other++;
        close(fd);
    }
    return NULL;
}

static int client(const char *ip, const char *port, int threads, double seconds)
{
    target.sin_family = AF_INET;
    target.sin_port = htons(parse_int(port, 1, 65535, "port"));
    if (inet_pton(AF_INET, ip, &target.sin_addr) != 1) {
        fprintf(stderr, "connrate: bad IPv4 address %s\n", ip);
        return 2;
    }
    pthread_t th[MAX_THREADS];
    struct counts *c = calloc(threads, sizeof(*c));
    if (!c)
        die("calloc");
    double start = now();
    deadline = start + seconds;
    for (int t = 0; t < threads; t++)
        if (pthread_create(&th[t], NULL, connect_loop, &c[t]) != 0)
            die("pthread_create");
    struct counts total = {0};
    for (int t = 0; t < threads; t++) {
        pthread_join(th[t], NULL);
        total.ok += c[t].ok;
        total.refused += c[t].refused;
        total.timeout += c[t].timeout;
        total.other += c[t].other;
    }
    double elapsed = now() - start;
    printf("{\"ok\": %lu, \"refused\": %lu, \"timeout\": %lu, \"other\": %lu, "
           "\"seconds\": %.4f, \"rate\": %.1f}\n",
           total.ok, total.refused, total.timeout, total.other, elapsed, total.ok / elapsed);
    free(c);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 5 && strcmp(argv[1], "server") == 0)
        return server(argv[2], argv[3], parse_int(argv[4], 1, MAX_THREADS / MAX_PORTS, "threads"));
    if ((argc == 6 || argc == 7) && strcmp(argv[1], "client") == 0) {
        if (argc == 7)
            connect_timeout_ms = parse_int(argv[6], 1, 60000, "timeout");
        double seconds = atof(argv[5]);
        if (!(seconds > 0 && seconds <= 3600)) {
            fprintf(stderr, "connrate: bad duration %s\n", argv[5]);
            return 2;
        }
        return client(argv[2], argv[3], parse_int(argv[4], 1, MAX_THREADS, "threads"), seconds);
    }
    fprintf(stderr,
            "usage: connrate server IP PORT[,PORT...] THREADS\n"
            "       connrate client IP PORT THREADS SECONDS [CONNECT_TIMEOUT_MS]\n");
    return 2;
}
