/*
 * np-cni-shim: the np-cni CNI plugin as installed on a node's host (/opt/cni/bin/np-cni).
 *
 * Why: a container runtime executes CNI plugins on the host, which has no Python. This shim
 * is a small static binary that forwards the CNI request to np-agent over the agent's unix
 * socket; the agent runs np-cni's command handler in-process and sends back what the plugin
 * would have printed. Build: musl-gcc -static -Os -o np-cni cni/shim/np-cni-shim.c
 * (plain gcc works too).
 *
 * Wire format (np_cni/shared/shimproto.py is the other side; keep both in step):
 *
 *   request  "NPCNI/1\n"                   magic first line (the JSON-line protocol of the
 *                                          same socket starts with '{')
 *            "KEY=VALUE\n" ...             the CNI_* variables that are set: CNI_COMMAND,
 *                                          CNI_CONTAINERID, CNI_NETNS, CNI_IFNAME, CNI_ARGS,
 *                                          CNI_PATH (values never contain a newline)
 *            "\n"                          end of the header
 *            <stdin bytes>                 the network configuration, verbatim, until
 *                                          shutdown(SHUT_WR)
 *            The first sendmsg carries, with SCM_RIGHTS, a descriptor of CNI_NETNS opened
 *            O_RDONLY when it can be opened: the agent's container does not see the host's
 *            netns paths, but it can use the descriptor.
 *   answer   "<exit code>\n" then the plugin's stdout until EOF.
 *
 * When the agent cannot be reached (no socket, refused, no complete answer in time):
 * ADD, CHECK, GC and unknown commands answer CNI error 11 ("try again later"), STATUS 50;
 * nothing is left behind since nothing was done. DEL succeeds: it is written, in the same
 * format minus the descriptor, to the pending directory (<dir>/<containerid>_<ifname>, temp
 * file + rename) and np-agent replays it when it is back, so a pod never hangs in Terminating
 * because the agent was restarting. VERSION is answered here, without the agent.
 *
 * Environment for tests: NP_NFT_CNI_SOCKET (default /run/np-nft/cni.sock),
 * NP_NFT_PENDING_DIR (default /var/lib/np-nft/pending-del), NP_NFT_CNI_TIMEOUT (seconds for
 * the whole exchange, default 60: an ADD may take ~30 s when the agent is busy).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

/* uninstall-node recognises our binary by this string (it must survive -Os and strip). */
__attribute__((used)) static const char MARKER[] = "np-nft-cni-shim/1";

#define MAGIC "NPCNI/1\n"
#define DEFAULT_SOCKET "/run/np-nft/cni.sock"
#define DEFAULT_PENDING "/var/lib/np-nft/pending-del"
#define DEFAULT_TIMEOUT_S 60
#define MAX_STDIN (16u << 20)   /* a network config is KBs; refuse absurd input */
#define MAX_ANSWER (16u << 20)
/* Same list as np_cni.spec.SUPPORTED_VERSIONS (tests compare them). */
#define SUPPORTED_VERSIONS "[\"0.4.0\",\"1.0.0\",\"1.1.0\"]"

static const char *const KEYS[] = {"CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS",
                                   "CNI_IFNAME", "CNI_ARGS", "CNI_PATH"};

struct buf {
    char *data;
    size_t len, cap;
};

/* Append n bytes, growing geometrically; -1 when it would exceed max or memory runs out. */
static int buf_add(struct buf *b, const void *p, size_t n, size_t max)
{
    if (n > max || b->len > max - n)
        return -1;
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->len + n + 1)
            cap *= 2;
        char *d = realloc(b->data, cap);
        if (!d)
            return -1;
        b->data = d;
        b->cap = cap;
    }
    memcpy(b->data + b->len, p, n);
    b->len += n;
    b->data[b->len] = '\0'; /* always a C string too, for the scans below */
    return 0;
}

static int buf_str(struct buf *b, const char *s) { return buf_add(b, s, strlen(s), MAX_STDIN); }

/* write() all of it, through EINTR and partial writes (stdout may be a pipe). */
static int write_all(int fd, const char *p, size_t n)
{
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return -1;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

static int read_stdin(struct buf *in)
{
    char chunk[65536];
    for (;;) {
        ssize_t r = read(0, chunk, sizeof chunk);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            return -1;
        if (r == 0)
            return 0;
        if (buf_add(in, chunk, (size_t)r, MAX_STDIN) < 0)
            return -1;
    }
}

/* The config's cniVersion when it is a plain "x.y.z" string, else the newest we speak:
 * error results should carry the version the runtime asked for. */
static void config_version(const char *conf, char out[16])
{
    strcpy(out, "1.1.0");
    const char *p = conf ? strstr(conf, "\"cniVersion\"") : NULL;
    if (!p)
        return;
    p += strlen("\"cniVersion\"");
    while (*p == ' ' || *p == '\t' || *p == '\r' || *p == '\n')
        p++;
    if (*p++ != ':')
        return;
    while (*p == ' ' || *p == '\t' || *p == '\r' || *p == '\n')
        p++;
    if (*p++ != '"')
        return;
    size_t n = strspn(p, "0123456789.");
    if (n == 0 || n > 15 || p[n] != '"')
        return;
    memcpy(out, p, n);
    out[n] = '\0';
}

static void json_escaped(struct buf *b, const char *s)
{
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        char esc[8];
        if (c == '"' || c == '\\') {
            esc[0] = '\\';
            esc[1] = (char)c;
            buf_add(b, esc, 2, MAX_STDIN);
        } else if (c < 0x20) {
            snprintf(esc, sizeof esc, "\\u%04x", c);
            buf_str(b, esc);
        } else {
            buf_add(b, s, 1, MAX_STDIN);
        }
    }
}

/* Print a CNI error object on stdout (what the runtime reads) and return the exit code 1. */
static int cni_error(const char *version, int code, const char *details, const char *fmt, ...)
{
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    struct buf b = {0};
    char head[64];
    buf_str(&b, "{\"cniVersion\":\"");
    json_escaped(&b, version);
    snprintf(head, sizeof head, "\",\"code\":%d,\"msg\":\"", code);
    buf_str(&b, head);
    json_escaped(&b, msg);
    if (details) {
        buf_str(&b, "\",\"details\":\"");
        json_escaped(&b, details);
    }
    buf_str(&b, "\"}\n");
    if (b.data)
        write_all(1, b.data, b.len);
    free(b.data);
    return 1;
}

/* Header of the framing: magic, the CNI_* variables present, empty line. -1 names a bad one. */
static int build_header(struct buf *h, const char **bad)
{
    buf_str(h, MAGIC);
    for (size_t i = 0; i < sizeof KEYS / sizeof KEYS[0]; i++) {
        const char *v = getenv(KEYS[i]);
        if (!v)
            continue;
        if (strchr(v, '\n')) {
            *bad = KEYS[i];
            return -1;
        }
        if (buf_str(h, KEYS[i]) < 0 || buf_str(h, "=") < 0 || buf_str(h, v) < 0 ||
            buf_str(h, "\n") < 0) {
            *bad = KEYS[i];
            return -1;
        }
    }
    return buf_str(h, "\n");
}

static long long now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Wait until fd is ready for events or the deadline passes (0 ready, -1 timeout/error). */
static int wait_ready(int fd, short events, long long deadline)
{
    for (;;) {
        long long left = deadline - now_ms();
        if (left <= 0) {
            errno = ETIMEDOUT;
            return -1;
        }
        struct pollfd p = {.fd = fd, .events = events};
        int r = poll(&p, 1, left > INT_MAX ? INT_MAX : (int)left);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            return -1;
        if (r > 0)
            return 0;
    }
}

/* Send it all on the non-blocking socket; the first sendmsg carries nsfd (if >= 0). */
static int send_all(int s, const char *p, size_t n, int *nsfd, long long deadline)
{
    while (n > 0) {
        struct iovec iov = {.iov_base = (void *)p, .iov_len = n};
        struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1};
        union {
            char buf[CMSG_SPACE(sizeof(int))];
            struct cmsghdr align;
        } ctl;
        if (*nsfd >= 0) {
            memset(&ctl, 0, sizeof ctl);
            msg.msg_control = ctl.buf;
            msg.msg_controllen = sizeof ctl.buf;
            struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
            c->cmsg_level = SOL_SOCKET;
            c->cmsg_type = SCM_RIGHTS;
            c->cmsg_len = CMSG_LEN(sizeof(int));
            memcpy(CMSG_DATA(c), nsfd, sizeof(int));
        }
        ssize_t w = sendmsg(s, &msg, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            if (wait_ready(s, POLLOUT, deadline) < 0)
                return -1;
            continue;
        }
        if (w <= 0)
            return -1;
        *nsfd = -1; /* it went with the first bytes */
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

static int recv_all(int s, struct buf *out, long long deadline)
{
    char chunk[65536];
    for (;;) {
        ssize_t r = recv(s, chunk, sizeof chunk, 0);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            if (wait_ready(s, POLLIN, deadline) < 0)
                return -1;
            continue;
        }
        if (r < 0)
            return -1;
        if (r == 0)
            return 0;
        if (buf_add(out, chunk, (size_t)r, MAX_ANSWER) < 0) {
            errno = EMSGSIZE;
            return -1;
        }
    }
}

static int connect_agent(const char *path, long long deadline)
{
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof a.sun_path) {
        errno = ENAMETOOLONG;
        return -1;
    }
    strcpy(a.sun_path, path);
    int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (s < 0)
        return -1;
    for (;;) {
        if (connect(s, (struct sockaddr *)&a, sizeof a) == 0)
            return s;
        if (errno == EINTR)
            continue;
        /* A unix socket whose accept backlog is full answers EAGAIN: retry shortly. */
        if (errno == EAGAIN && now_ms() + 50 < deadline) {
            struct timespec ts = {0, 50 * 1000000L};
            nanosleep(&ts, NULL);
            continue;
        }
        int e = errno;
        close(s);
        errno = e;
        return -1;
    }
}

/* One exchange with the agent. 0 with *code and *out set; -1 with *why on any failure. */
static int ask_agent(const char *path, const struct buf *hdr, const struct buf *in, int nsfd,
                     int timeout_s, int *code, struct buf *out, const char **why)
{
    long long deadline = now_ms() + (long long)timeout_s * 1000;
    int s = connect_agent(path, deadline);
    if (s < 0) {
        *why = strerror(errno);
        return -1;
    }
    int fd = nsfd;
    if (send_all(s, hdr->data, hdr->len, &fd, deadline) < 0 ||
        (in->len && send_all(s, in->data, in->len, &fd, deadline) < 0)) {
        *why = errno == ETIMEDOUT ? "timed out sending the request" : strerror(errno);
        close(s);
        return -1;
    }
    shutdown(s, SHUT_WR);
    int r = recv_all(s, out, deadline);
    int e = errno;
    close(s);
    if (r < 0) {
        *why = e == ETIMEDOUT ? "no answer in time" : strerror(e);
        return -1;
    }
    /* "<exit code>\n": 1 to 3 digits, then the plugin's stdout. */
    char *nl = out->data ? memchr(out->data, '\n', out->len < 5 ? out->len : 5) : NULL;
    if (!nl || nl == out->data || strspn(out->data, "0123456789") != (size_t)(nl - out->data)) {
        *why = out->len ? "unreadable answer" : "connection closed without an answer";
        return -1;
    }
    *code = atoi(out->data);
    if (*code > 255)
        *code = 1;
    size_t skip = (size_t)(nl - out->data) + 1;
    memmove(out->data, out->data + skip, out->len - skip);
    out->len -= skip;
    return 0;
}

/* CNI_CONTAINERID and CNI_IFNAME become a file name: [A-Za-z0-9_.-], alphanumeric first. */
static int safe_name(const char *s)
{
    if (!s || !*s || strlen(s) > 200)
        return 0;
    if (!((*s >= 'a' && *s <= 'z') || (*s >= 'A' && *s <= 'Z') || (*s >= '0' && *s <= '9')))
        return 0;
    return strspn(s, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-") ==
           strlen(s);
}

static int mkdir_p(const char *dir)
{
    char p[PATH_MAX];
    if (snprintf(p, sizeof p, "%s", dir) >= (int)sizeof p)
        return -1;
    for (char *c = p + 1; *c; c++) {
        if (*c != '/')
            continue;
        *c = '\0';
        if (mkdir(p, 0755) < 0 && errno != EEXIST)
            return -1;
        *c = '/';
    }
    return mkdir(p, 0700) < 0 && errno != EEXIST ? -1 : 0;
}

/* Write the DEL request for the agent to replay: temp file, fsync, rename, fsync dir. */
static int spool_del(const char *dir, const struct buf *hdr, const struct buf *in,
                     const char **why)
{
    const char *cid = getenv("CNI_CONTAINERID"), *ifname = getenv("CNI_IFNAME");
    char path[PATH_MAX], tmp[PATH_MAX];
    if (!safe_name(cid) || !safe_name(ifname)) {
        *why = "CNI_CONTAINERID or CNI_IFNAME is missing or has characters outside "
               "[A-Za-z0-9_.-]";
        return -1;
    }
    if (snprintf(path, sizeof path, "%s/%s_%s", dir, cid, ifname) >= (int)sizeof path ||
        snprintf(tmp, sizeof tmp, "%s/.tmp-%s_%s.%ld", dir, cid, ifname, (long)getpid()) >=
            (int)sizeof tmp) {
        *why = "pending path too long";
        return -1;
    }
    if (mkdir_p(dir) < 0) {
        *why = strerror(errno);
        return -1;
    }
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0) {
        *why = strerror(errno);
        return -1;
    }
    int ok = write_all(fd, hdr->data, hdr->len) == 0 &&
             (!in->len || write_all(fd, in->data, in->len) == 0) && fsync(fd) == 0;
    int e = errno;
    if (close(fd) < 0 && ok) {
        ok = 0;
        e = errno;
    }
    if (!ok || rename(tmp, path) < 0) {
        e = ok ? errno : e;
        unlink(tmp);
        *why = strerror(e);
        return -1;
    }
    int d = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (d >= 0) {
        fsync(d);
        close(d);
    }
    return 0;
}

static const char *env_or(const char *name, const char *fallback)
{
    const char *v = getenv(name);
    return v && *v ? v : fallback;
}

int main(int argc, char **argv)
{
    signal(SIGPIPE, SIG_IGN);
    if (argc > 1 && (!strcmp(argv[1], "-h") || !strcmp(argv[1], "--help"))) {
        printf("%s: np-cni for the host (%s). Run by a container runtime: CNI_* variables in "
               "the environment, the network configuration on stdin; forwarded to np-agent "
               "on %s.\n", argv[0], MARKER, env_or("NP_NFT_CNI_SOCKET", DEFAULT_SOCKET));
        return 0;
    }
    const char *cmd = env_or("CNI_COMMAND", "");
    struct buf in = {0}, hdr = {0}, out = {0};
    char version[16];
    if (read_stdin(&in) < 0)
        return cni_error("1.1.0", 6, NULL, "cannot read the network configuration on stdin "
                         "(more than %u bytes, or a read error)", MAX_STDIN);
    config_version(in.data, version);
    if (!strcmp(cmd, "VERSION")) {
        printf("{\"cniVersion\":\"%s\",\"supportedVersions\":%s}\n", version,
               SUPPORTED_VERSIONS);
        return fflush(stdout) == 0 ? 0 : 1;
    }
    const char *bad = NULL;
    if (build_header(&hdr, &bad) < 0)
        return cni_error(version, 4, NULL, "%s contains a newline or is too long", bad);

    const char *netns = getenv("CNI_NETNS");
    int nsfd = netns && *netns ? open(netns, O_RDONLY | O_CLOEXEC) : -1;
    const char *sock = env_or("NP_NFT_CNI_SOCKET", DEFAULT_SOCKET);
    int timeout = atoi(env_or("NP_NFT_CNI_TIMEOUT", "60"));
    int code = 1;
    const char *why = NULL;
    int r = ask_agent(sock, &hdr, &in, nsfd, timeout > 0 ? timeout : DEFAULT_TIMEOUT_S, &code,
                      &out, &why);
    if (nsfd >= 0)
        close(nsfd);
    if (r == 0) {
        if (out.len && write_all(1, out.data, out.len) < 0)
            return 1;
        return code;
    }
    const char *hint = "is the np-agent DaemonSet running on this node?";
    if (!strcmp(cmd, "DEL")) {
        const char *dir = env_or("NP_NFT_PENDING_DIR", DEFAULT_PENDING);
        const char *spool_why = NULL;
        if (spool_del(dir, &hdr, &in, &spool_why) == 0)
            return 0;
        return cni_error(version, 11, hint, "np-agent is not reachable on %s (%s) and the DEL "
                         "could not be queued in %s: %s", sock, why, dir, spool_why);
    }
    return cni_error(version, strcmp(cmd, "STATUS") ? 11 : 50, hint,
                     "np-agent is not reachable on %s: %s", sock, why);
}
