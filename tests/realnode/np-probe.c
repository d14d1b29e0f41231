/* np-probe: the reachability probe of the real-node tests, a static binary in the busybox
 * test image (Debian's busybox nc has neither UDP nor a way to probe many peers at once).
 *
 *   np-probe serve PORT...                  answer TCP (accept, "ok\n", close) and UDP (echo)
 *                                           on every PORT, IPv4 and IPv6
 *   np-probe probe TIMEOUT_MS PROTO:IP:PORT...
 *                                           probe every target at once; print one line each:
 *                                           "PROTO:IP:PORT ok|timeout|refused|error"
 *   np-probe watch INTERVAL_MS TIMEOUT_MS PROTO:IP:PORT...
 *                                           probe again and again, forever; each round prints
 *                                           "<unix time in ms> " before each probe line
 *
 * A TCP probe is ok when the handshake completes, a UDP probe when the echo comes back: a
 * NetworkPolicy drop shows as "timeout". IPv6 targets are written [IP]:PORT.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_PORTS 16
#define MAX_TARGETS 512

static int listen_socket(int type, int port) {
  int fd = socket(AF_INET6, type, 0), off = 0, on = 1;
  struct sockaddr_in6 a = {.sin6_family = AF_INET6, .sin6_port = htons(port)};
  if (fd < 0) return -1;
  setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &off, sizeof off);
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &on, sizeof on);
  if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0) { perror("bind"); exit(1); }
  if (type == SOCK_STREAM && listen(fd, 128) < 0) { perror("listen"); exit(1); }
  return fd;
}

static _Noreturn void serve(int argc, char **argv) {
  struct pollfd fds[2 * MAX_PORTS];
  int n = 0;
  signal(SIGPIPE, SIG_IGN);
  for (int i = 0; i < argc && i < MAX_PORTS; i++) {
    int port = atoi(argv[i]);
    fds[n++] = (struct pollfd){.fd = listen_socket(SOCK_STREAM, port), .events = POLLIN};
    fds[n++] = (struct pollfd){.fd = listen_socket(SOCK_DGRAM, port), .events = POLLIN};
  }
  printf("serving TCP and UDP on %d port(s)\n", n / 2);
  fflush(stdout);
  for (;;) {
    if (poll(fds, n, -1) < 0) continue;
    for (int i = 0; i < n; i++) {
      if (!(fds[i].revents & POLLIN)) continue;
      if (i % 2 == 0) {
        int c = accept(fds[i].fd, NULL, NULL);
        if (c >= 0) { (void)!write(c, "ok\n", 3); close(c); }
      } else {
        char buf[512];
        struct sockaddr_storage from;
        socklen_t len = sizeof from;
        ssize_t got = recvfrom(fds[i].fd, buf, sizeof buf, 0, (struct sockaddr *)&from, &len);
        if (got > 0) sendto(fds[i].fd, buf, got, 0, (struct sockaddr *)&from, len);
      }
    }
  }
}

struct target {
  const char *text;
  int udp, fd;
  const char *result;
};

static int parse(struct target *t, struct sockaddr_storage *sa, socklen_t *len) {
  char host[128];
  const char *rest = t->text;
  if (strncmp(rest, "tcp:", 4) == 0) t->udp = 0;
  else if (strncmp(rest, "udp:", 4) == 0) t->udp = 1;
  else return -1;
  rest += 4;
  const char *colon = strrchr(rest, ':');
  if (!colon || colon - rest >= (long)sizeof host) return -1;
  int port = atoi(colon + 1);
  if (*rest == '[') { memcpy(host, rest + 1, colon - rest - 2); host[colon - rest - 2] = 0; }
  else { memcpy(host, rest, colon - rest); host[colon - rest] = 0; }
  struct sockaddr_in *a4 = (struct sockaddr_in *)sa;
  struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)sa;
  memset(sa, 0, sizeof *sa);
  if (inet_pton(AF_INET, host, &a4->sin_addr) == 1) {
    a4->sin_family = AF_INET; a4->sin_port = htons(port); *len = sizeof *a4;
  } else if (inet_pton(AF_INET6, host, &a6->sin6_addr) == 1) {
    a6->sin6_family = AF_INET6; a6->sin6_port = htons(port); *len = sizeof *a6;
  } else return -1;
  return 0;
}

static long now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int probe(int timeout_ms, int argc, char **argv, const char *prefix) {
  static struct target t[MAX_TARGETS];
  static struct pollfd fds[MAX_TARGETS];
  int n = argc < MAX_TARGETS ? argc : MAX_TARGETS, open_ = 0;
  for (int i = 0; i < n; i++) {
    struct sockaddr_storage sa;
    socklen_t len;
    t[i] = (struct target){.text = argv[i], .fd = -1, .result = NULL};
    fds[i] = (struct pollfd){.fd = -1};
    if (parse(&t[i], &sa, &len) < 0) { t[i].result = "error"; continue; }
    t[i].fd = socket(sa.ss_family, (t[i].udp ? SOCK_DGRAM : SOCK_STREAM) | SOCK_NONBLOCK, 0);
    if (t[i].fd < 0) { t[i].result = "error"; continue; }
    if (connect(t[i].fd, (struct sockaddr *)&sa, len) < 0 && errno != EINPROGRESS) {
      t[i].result = errno == ECONNREFUSED ? "refused" : "error";
      continue;
    }
    if (t[i].udp) (void)!send(t[i].fd, "ping", 4, 0);
    fds[i] = (struct pollfd){.fd = t[i].fd, .events = t[i].udp ? POLLIN : POLLOUT};
    open_++;
  }
  long deadline = now_ms() + timeout_ms;
  while (open_ > 0) {
    long left = deadline - now_ms();
    if (left <= 0) break;
    if (poll(fds, n, (int)left) < 0) continue;
    for (int i = 0; i < n; i++) {
      if (fds[i].fd < 0 || !fds[i].revents) continue;
      int err = 0;
      socklen_t l = sizeof err;
      if (t[i].udp) {
        char buf[16];
        t[i].result = recv(t[i].fd, buf, sizeof buf, 0) > 0 ? "ok"
                      : errno == ECONNREFUSED ? "refused" : "error";
      } else {
        getsockopt(t[i].fd, SOL_SOCKET, SO_ERROR, &err, &l);
        t[i].result = err == 0 ? "ok" : err == ECONNREFUSED ? "refused" : "error";
      }
      fds[i].fd = -1;
      open_--;
    }
  }
  for (int i = 0; i < n; i++) {
    printf("%s%s %s\n", prefix, t[i].text, t[i].result ? t[i].result : "timeout");
    if (t[i].fd >= 0) close(t[i].fd);
  }
  return 0;
}

/* Rounds start every interval_ms; each line carries the wall-clock time the round started,
 * so a test can line results up with when it changed a policy (same kernel clock). */
static _Noreturn void watch(int interval_ms, int timeout_ms, int argc, char **argv) {
  setvbuf(stdout, NULL, _IOLBF, 0);
  for (;;) {
    struct timespec wall;
    char prefix[32];
    long start = now_ms();
    clock_gettime(CLOCK_REALTIME, &wall);
    snprintf(prefix, sizeof prefix, "%lld ", (long long)wall.tv_sec * 1000 + wall.tv_nsec / 1000000);
    probe(timeout_ms, argc, argv, prefix);
    long left = start + interval_ms - now_ms();
    if (left > 0) usleep(left * 1000);
  }
}

int main(int argc, char **argv) {
  if (argc >= 3 && strcmp(argv[1], "serve") == 0) serve(argc - 2, argv + 2);
  if (argc >= 4 && strcmp(argv[1], "probe") == 0)
    return probe(atoi(argv[2]), argc - 3, argv + 3, "");
  if (argc >= 5 && strcmp(argv[1], "watch") == 0)
    watch(atoi(argv[2]), atoi(argv[3]), argc - 4, argv + 4);
  fprintf(stderr, "usage: np-probe serve PORT... | np-probe probe TIMEOUT_MS TARGET... | "
                  "np-probe watch INTERVAL_MS TIMEOUT_MS TARGET...\n");
  return 2;
}
