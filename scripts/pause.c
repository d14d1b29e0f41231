/* The pod sandbox ("pause") program of the test image localhost/np-nft/pause:1.0, built by
 * scripts/image pause with musl-gcc -static. It does what the upstream pause does: hold the
 * pod's namespaces by sleeping forever, exit 0 on SIGINT/SIGTERM, and, as PID 1 of a pod
 * that shares its PID namespace, reap every zombie it inherits (SIGCHLD).
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static void on_term(int sig) {
    /* async-signal-safe: write, _exit */
    static const char msg[] = "pause: shutting down\n";
    (void)sig;
    (void)!write(STDERR_FILENO, msg, sizeof msg - 1);
    _exit(0);
}

static void on_child(int sig) {
    int saved = errno;
    (void)sig;
    while (waitpid(-1, NULL, WNOHANG) > 0) {
    }
    errno = saved;
}

int main(int argc, char **argv) {
    if (argc > 1 && (strcmp(argv[1], "-v") == 0 || strcmp(argv[1], "--version") == 0)) {
        puts("pause (np-nft test image) 1.0");
        return 0;
    }
    if (getpid() != 1)
        fputs("pause: warning: not PID 1, zombies of other processes are not reaped\n", stderr);

    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sigemptyset(&sa.sa_mask);
    sa.sa_handler = on_term;
    if (sigaction(SIGINT, &sa, NULL) < 0 || sigaction(SIGTERM, &sa, NULL) < 0) {
        perror("pause: sigaction");
        return 1;
    }
    sa.sa_handler = on_child;
    sa.sa_flags = SA_NOCLDSTOP | SA_RESTART;
    if (sigaction(SIGCHLD, &sa, NULL) < 0) {
        perror("pause: sigaction");
        return 1;
    }
    for (;;)
        pause();
}
