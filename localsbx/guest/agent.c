/*
 * localsbx guest agent: PID 1 of every localsbx guest and the helper behind every
 * command the host runs over SSH.  One static binary (gcc -static -Os), installed
 * at /usr/lib/localsbx/agent when the base image is built.
 *
 * The verbs implement the guest side of the contract in docs/ARCHITECTURE.md
 * ("The guest contract"); keep the two in sync.
 *
 *   agent init                      PID 1: runs the management sshd, reaps, powers off
 *   agent init --exec INIT          PID 1 becomes INIT (systemd); a forked child (the kit
 *                                   keeper) runs the management sshd and READY marker
 *   agent exec [opts] -- ARGV...    set up env/cwd/user/cgroup/stdin, then execvp in place
 *   agent kill NAME [--signal N] [--timeout S]
 *   agent fixup [--time-ns N] [--entropy HEX] [--machine-id HEX32 --hostname NAME]
 *   agent put PATH [--mode OCTAL] [--size N]
 *                                   stdin -> PATH atomically (with --size: only after
 *                                   exactly N bytes and then end of input)
 *   agent get PATH                  PATH -> stdout
 *   agent spawn DIR [--stdin] -- EXEC-ARGS...
 *                                   run `agent exec EXEC-ARGS` in the background, its
 *                                   stdout/stderr/exit status in files under DIR (below)
 *   agent follow DIR OUT-OFF ERR-OFF
 *                                   DIR's stdout/stderr from those offsets, until it ended
 *   agent stdin DIR [--close]       stdin -> DIR's process; --close ends its input
 *   agent sync
 *   agent resizefs BYTES [MOUNT]    grow MOUNT's ext4 (default /) online to BYTES, once
 *                                   its block device is that big (waits up to 10 s)
 *   agent poweroff                  exit 0 at once; PID 1 powers off 0.2 s later
 *   agent -c 'exec /usr/lib/localsbx/agent VERB ...'
 *                                   as the login shell of the `localsbx` account (uid 0)
 *
 * Exit status: 0 success; 1 the verb failed (message on stderr, prefixed "localsbx:");
 * 2 usage error.  `exec` follows the shell: 126 when the command cannot be started
 * (bad cwd, user, cgroup, not executable), 127 when it is not found; otherwise the
 * process *is* the user's command, so its status (or signal) is the command's own.
 *
 * Invoked as ".../sshd" (a symlink to this file) it starts the bundled dropbear through
 * its bundled dynamic loader.  Dropbear re-executes argv[0] for every connection
 * (fexecve of open(argv[0])), so argv[0] must be a file that re-enters the loader:
 * this binary, under that name.
 *
 * No NSS: users and groups are read from the guest's /etc/passwd and /etc/group
 * directly (a static glibc cannot safely dlopen the distribution's NSS modules).
 *
 * The boot kit: this binary and the dropbear bundle come from the initramfs (mounted
 * read-only at /usr/lib/localsbx by /init), not from the user's root filesystem.  So
 * that any rootfs works (no `localsbx` account, no /etc/passwd, no /etc/shells, an
 * nsswitch.conf naming modules we do not bundle), dropbear runs in a mount namespace
 * of its own whose /etc is a small tmpfs written here (mgmt_namespace); every other
 * invocation of the agent (the login shell and its verbs) first joins PID 1's mount
 * namespace again (join_init_namespace), so commands see the user's real /etc.
 */
#define _GNU_SOURCE
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <poll.h>
#include <linux/random.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sched.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/sysmacros.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define LIBDIR "/usr/lib/localsbx"
#define SSHD_LINK LIBDIR "/sshd"
#define DROPBEAR_DIR LIBDIR "/dropbear"
#define DROPBEAR_LOADER DROPBEAR_DIR "/ld.so"
#define DROPBEAR_BIN DROPBEAR_DIR "/dropbear"
#define RUN_DIR "/run/localsbx"
#define HOST_KEY RUN_DIR "/dropbear_ed25519_host_key"
#define AUTHKEYS_DIR RUN_DIR "/ssh"
#define SSHD_LOG RUN_DIR "/sshd.log"
#define SSH_PORT "10022"
#define SSH_PORT_HEX ":2726 " /* 10022 in /proc/net/tcp notation */
#define CGROUP_ROOT "/sys/fs/cgroup/localsbx"
#define READY_MARKER "LOCALSBX-READY\n"
#define POWEROFF_DELAY_MS 200

#define EXIT_FAIL 1
#define EXIT_USAGE 2
#define EXIT_CANNOT_EXEC 126
#define EXIT_NOT_FOUND 127

/* ------------------------------------------------------------------ helpers */

static void msg(const char *fmt, ...) {
    char buf[1024];
    va_list ap;
    int n = snprintf(buf, sizeof buf, "localsbx: ");
    va_start(ap, fmt);
    n += vsnprintf(buf + n, sizeof buf - n, fmt, ap);
    va_end(ap);
    if (n >= (int)sizeof buf - 1) n = sizeof buf - 2;
    buf[n++] = '\n';
    (void)!write(2, buf, n);
}

static void console(const char *text) {
    int fd = open("/dev/console", O_WRONLY | O_NOCTTY | O_CLOEXEC);
    if (fd < 0) fd = dup(2);
    if (fd >= 0) {
        (void)!write(fd, text, strlen(text));
        close(fd);
    }
}

static _Noreturn void usage(const char *text) {
    msg("usage: %s", text);
    exit(EXIT_USAGE);
}

static int write_all(int fd, const void *data, size_t len) {
    const char *p = data;
    while (len > 0) {
        ssize_t w = write(fd, p, len);
        if (w < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        p += w;
        len -= (size_t)w;
    }
    return 0;
}

/* Copy everything from in to out; returns 0, or -1 with errno (*failed_read says which side). */
static int copy_fd(int in, int out, int *failed_read) {
    static char buf[65536];
    for (;;) {
        ssize_t r = read(in, buf, sizeof buf);
        if (r < 0) {
            if (errno == EINTR) continue;
            *failed_read = 1;
            return -1;
        }
        if (r == 0) return 0;
        if (write_all(out, buf, (size_t)r) < 0) {
            *failed_read = 0;
            return -1;
        }
    }
}

static int write_file(const char *path, const char *text) {
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    int rc = write_all(fd, text, strlen(text));
    int saved = errno;
    close(fd);
    errno = saved;
    return rc;
}

static int parse_long(const char *s, long long min, long long max, long long *out) {
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (errno || end == s || *end || v < min || v > max) return -1;
    *out = v;
    return 0;
}

static int mkdir_p(const char *path, mode_t mode) {
    char tmp[PATH_MAX];
    if (snprintf(tmp, sizeof tmp, "%s", path) >= (int)sizeof tmp) {
        errno = ENAMETOOLONG;
        return -1;
    }
    for (char *p = tmp + 1; *p; p++) {
        if (*p != '/') continue;
        *p = 0;
        if (mkdir(tmp, mode) < 0 && errno != EEXIST) return -1;
        *p = '/';
    }
    if (mkdir(tmp, mode) < 0 && errno != EEXIST) return -1;
    return 0;
}

static void sleep_ms(long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR) {
    }
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

/* A cgroup name is one path component: no '/', not "." or "..", printable. */
static int valid_cgroup_name(const char *name) {
    size_t n = strlen(name);
    if (n == 0 || n > 200 || !strcmp(name, ".") || !strcmp(name, "..")) return 0;
    for (const char *p = name; *p; p++)
        if (*p == '/' || !isgraph((unsigned char)*p)) return 0;
    return 1;
}

static void reset_signals(void) {
    sigset_t all;
    for (int sig = 1; sig < NSIG; sig++) signal(sig, SIG_DFL); /* errors for KILL/STOP: fine */
    sigemptyset(&all);
    sigprocmask(SIG_SETMASK, &all, NULL);
}

/* ---------------------------------------------------- /etc/passwd, /etc/group */

struct user {
    uid_t uid;
    gid_t gid;
    char name[256];
};

/* Find a passwd entry by name or (when numeric) uid.  Returns 1 found, 0 not found, -1 error. */
static int lookup_user(const char *spec, struct user *out) {
    long long num = -1;
    int numeric = parse_long(spec, 0, UINT32_MAX - 1, &num) == 0;
    FILE *f = fopen("/etc/passwd", "re");
    if (!f) return numeric ? 0 : -1;
    char line[4096];
    int found = 0;
    while (fgets(line, sizeof line, f)) {
        char *fields[7] = {0};
        char *save = line;
        for (int i = 0; i < 7; i++) fields[i] = strsep(&save, ":\n");
        if (!fields[0] || !fields[2] || !fields[3]) continue;
        long long uid, gid;
        if (parse_long(fields[2], 0, UINT32_MAX - 1, &uid) || parse_long(fields[3], 0, UINT32_MAX - 1, &gid))
            continue;
        if (numeric ? uid == num : !strcmp(fields[0], spec)) {
            out->uid = (uid_t)uid;
            out->gid = (gid_t)gid;
            snprintf(out->name, sizeof out->name, "%s", fields[0]);
            found = 1;
            break;
        }
    }
    fclose(f);
    return found;
}

/* Resolve a group name or number.  Returns 1 found, 0 not found, -1 error. */
static int lookup_group(const char *spec, gid_t *out) {
    long long num;
    if (parse_long(spec, 0, UINT32_MAX - 1, &num) == 0) {
        *out = (gid_t)num;
        return 1;
    }
    FILE *f = fopen("/etc/group", "re");
    if (!f) return -1;
    char line[65536];
    int found = 0;
    while (fgets(line, sizeof line, f)) {
        char *save = line;
        char *name = strsep(&save, ":\n");
        strsep(&save, ":\n");
        char *gid = strsep(&save, ":\n");
        long long g;
        if (name && gid && !strcmp(name, spec) && parse_long(gid, 0, UINT32_MAX - 1, &g) == 0) {
            *out = (gid_t)g;
            found = 1;
            break;
        }
    }
    fclose(f);
    return found;
}

/* Supplementary groups of a user: its primary group plus every group listing it. */
static int supplementary_groups(const char *user, gid_t primary, gid_t *groups, int max) {
    int n = 0;
    groups[n++] = primary;
    FILE *f = fopen("/etc/group", "re");
    if (!f) return n;
    char line[65536];
    while (fgets(line, sizeof line, f) && n < max) {
        char *save = line;
        strsep(&save, ":\n");
        strsep(&save, ":\n");
        char *gid = strsep(&save, ":\n");
        char *members = strsep(&save, "\n");
        long long g;
        if (!gid || !members || parse_long(gid, 0, UINT32_MAX - 1, &g)) continue;
        for (char *m; (m = strsep(&members, ",")) != NULL;) {
            if (!strcmp(m, user)) {
                int dup = 0;
                for (int i = 0; i < n; i++) dup |= groups[i] == (gid_t)g;
                if (!dup) groups[n++] = (gid_t)g;
                break;
            }
        }
    }
    fclose(f);
    return n;
}

/* Switch to "U[:G]".  Like Docker: with an explicit group the user's supplementary
 * groups are not added; a numeric uid without a passwd entry gets gid 0. */
static int switch_user(const char *spec) {
    char buf[512];
    if (snprintf(buf, sizeof buf, "%s", spec) >= (int)sizeof buf) {
        msg("--user %s: too long", spec);
        return -1;
    }
    char *colon = strchr(buf, ':');
    char *group = NULL;
    if (colon) {
        *colon = 0;
        group = colon + 1;
    }
    if (!*buf || (group && !*group)) {
        msg("--user %s: expected USER[:GROUP]", spec);
        return -1;
    }
    struct user u = {0};
    int r = lookup_user(buf, &u);
    if (r < 0) {
        msg("--user %s: cannot read /etc/passwd: %s", spec, strerror(errno));
        return -1;
    }
    if (r == 0) {
        long long num;
        if (parse_long(buf, 0, UINT32_MAX - 1, &num)) {
            msg("--user %s: no such user in /etc/passwd", spec);
            return -1;
        }
        u.uid = (uid_t)num;
        u.gid = 0;
        u.name[0] = 0;
    }
    gid_t groups[256];
    int ngroups;
    if (group) {
        gid_t gid;
        r = lookup_group(group, &gid);
        if (r <= 0) {
            msg("--user %s: no such group in /etc/group", spec);
            return -1;
        }
        u.gid = gid;
        groups[0] = gid;
        ngroups = 1;
    } else if (u.name[0]) {
        ngroups = supplementary_groups(u.name, u.gid, groups, 256);
    } else {
        groups[0] = u.gid;
        ngroups = 1;
    }
    if (setgroups((size_t)ngroups, groups) < 0 || setgid(u.gid) < 0 || setuid(u.uid) < 0) {
        msg("--user %s: %s", spec, strerror(errno));
        return -1;
    }
    return 0;
}

/* ---------------------------------------------------------------------- exec */

static char **read_argfile(const char *path) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        msg("--argfile %s: %s", path, strerror(errno));
        return NULL;
    }
    size_t cap = 65536, len = 0;
    char *data = malloc(cap + 1);
    for (;;) {
        if (len == cap) data = realloc(data, (cap *= 2) + 1);
        ssize_t r = read(fd, data + len, cap - len);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) {
            msg("--argfile %s: %s", path, strerror(errno));
            close(fd);
            return NULL;
        }
        if (r == 0) break;
        len += (size_t)r;
    }
    close(fd);
    unlink(path);
    if (len == 0) {
        msg("--argfile %s: empty", path);
        return NULL;
    }
    if (data[len - 1] != 0) data[len++] = 0; /* a trailing NUL is optional */
    size_t count = 0;
    for (size_t i = 0; i < len; i++) count += data[i] == 0;
    char **argv = calloc(count + 1, sizeof *argv);
    size_t k = 0;
    for (size_t i = 0; i < len; i += strlen(data + i) + 1) argv[k++] = data + i;
    return argv;
}

static int join_cgroup(const char *name) {
    char path[PATH_MAX];
    if (!valid_cgroup_name(name)) {
        msg("--cgroup %s: invalid name", name);
        return -1;
    }
    snprintf(path, sizeof path, CGROUP_ROOT "/%s", name);
    if (mkdir_p(path, 0755) < 0) {
        msg("--cgroup %s: mkdir %s: %s", name, path, strerror(errno));
        return -1;
    }
    strncat(path, "/cgroup.procs", sizeof path - strlen(path) - 1);
    if (write_file(path, "0") < 0) {
        msg("--cgroup %s: %s: %s", name, path, strerror(errno));
        return -1;
    }
    return 0;
}

static int cmd_fixup(int argc, char **argv);

static int cmd_exec(int argc, char **argv) {
    const char *cwd = NULL, *user = NULL, *cgroup = NULL, *argfile = NULL;
    char *fixup_args[9];
    int nfixup = 0;
    int want_stdin = 0;
    char **envs = calloc((size_t)argc + 1, sizeof *envs);
    int nenv = 0, i;
    static const char use[] =
        "exec [--cwd DIR] [--user U[:G]] [--env K=V]... [--cgroup NAME] [--stdin] "
        "[--argfile PATH] [--fixup-time-ns N] [--fixup-entropy HEX] "
        "[--fixup-machine-id HEX32 --fixup-hostname NAME] -- ARGV...";
    for (i = 0; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--")) {
            i++;
            break;
        } else if (!strcmp(a, "--stdin")) {
            want_stdin = 1;
        } else if (i + 1 >= argc) {
            usage(use);
        } else if (!strcmp(a, "--cwd")) {
            cwd = argv[++i];
        } else if (!strcmp(a, "--user")) {
            user = argv[++i];
        } else if (!strcmp(a, "--env")) {
            if (!strchr(argv[i + 1], '=') || argv[i + 1][0] == '=') usage(use);
            envs[nenv++] = argv[++i];
        } else if (!strcmp(a, "--cgroup")) {
            cgroup = argv[++i];
        } else if (!strcmp(a, "--argfile")) {
            argfile = argv[++i];
        } else if (!strcmp(a, "--fixup-time-ns")) {
            fixup_args[nfixup++] = "--time-ns";
            fixup_args[nfixup++] = argv[++i];
        } else if (!strcmp(a, "--fixup-entropy")) {
            fixup_args[nfixup++] = "--entropy";
            fixup_args[nfixup++] = argv[++i];
        } else if (!strcmp(a, "--fixup-machine-id")) {
            fixup_args[nfixup++] = "--machine-id";
            fixup_args[nfixup++] = argv[++i];
        } else if (!strcmp(a, "--fixup-hostname")) {
            fixup_args[nfixup++] = "--hostname";
            fixup_args[nfixup++] = argv[++i];
        } else {
            usage(use);
        }
        if (nfixup > 8) usage(use);
    }
    /* The first command after a snapshot restore carries the post-restore fixup (clock,
     * CRNG reseed, and for a new clone its machine-id and hostname), which must happen
     * before the user's command runs. */
    if (nfixup) {
        fixup_args[nfixup] = NULL;
        if (cmd_fixup(nfixup, fixup_args) != 0) return EXIT_CANNOT_EXEC;
    }
    char **cmd = argv + i;
    int ncmd = argc - i;
    if (argfile) {
        if (ncmd) usage(use);
        cmd = read_argfile(argfile);
        if (!cmd) return EXIT_CANNOT_EXEC;
    } else if (ncmd == 0) {
        usage(use);
    }

    if (cgroup && join_cgroup(cgroup) < 0) return EXIT_CANNOT_EXEC;
    if (!want_stdin) {
        int fd = open("/dev/null", O_RDONLY);
        if (fd < 0 || dup2(fd, 0) < 0) {
            msg("/dev/null: %s", strerror(errno));
            return EXIT_CANNOT_EXEC;
        }
        if (fd > 2) close(fd);
    }
    if (user && switch_user(user) < 0) return EXIT_CANNOT_EXEC;
    if (cwd && chdir(cwd) < 0) {
        msg("cannot change directory to %s: %s", cwd, strerror(errno));
        return EXIT_CANNOT_EXEC;
    }
    if (clearenv() != 0) {
        msg("clearenv failed");
        return EXIT_CANNOT_EXEC;
    }
    for (int k = 0; k < nenv; k++) {
        char *eq = strchr(envs[k], '=');
        *eq = 0;
        int rc = setenv(envs[k], eq + 1, 1);
        *eq = '=';
        if (rc < 0) {
            msg("--env %s: %s", envs[k], strerror(errno));
            return EXIT_CANNOT_EXEC;
        }
    }
    reset_signals();
    execvp(cmd[0], cmd);
    int err = errno;
    if (err == ENOENT || err == ENOTDIR) {
        if (strchr(cmd[0], '/'))
            msg("%s: %s", cmd[0], strerror(err));
        else
            msg("%s: command not found", cmd[0]);
        return EXIT_NOT_FOUND;
    }
    msg("%s: %s", cmd[0], strerror(err));
    return EXIT_CANNOT_EXEC;
}

/* ---------------------------------------------------------------------- kill */

/* 1 when the cgroup (and its descendants) has no live process, 0 when it has, -1 error. */
static int cgroup_empty(const char *dir) {
    char path[PATH_MAX], buf[4096];
    snprintf(path, sizeof path, "%s/cgroup.events", dir);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return errno == ENOENT ? 1 : -1;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n < 0) return -1;
    buf[n] = 0;
    return strstr(buf, "populated 0") != NULL;
}

/* Send sig to every process of dir and of its descendant cgroups. */
static void signal_tree(const char *dir, int sig) {
    char path[PATH_MAX];
    snprintf(path, sizeof path, "%s/cgroup.procs", dir);
    FILE *f = fopen(path, "re");
    if (f) {
        long pid;
        while (fscanf(f, "%ld", &pid) == 1)
            if (pid > 1) kill((pid_t)pid, sig);
        fclose(f);
    }
    DIR *d = opendir(dir);
    if (!d) return;
    for (struct dirent *e; (e = readdir(d)) != NULL;) {
        if (e->d_type != DT_DIR || e->d_name[0] == '.') continue;
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        signal_tree(path, sig);
    }
    closedir(d);
}

static int rmdir_tree(const char *dir) {
    char path[PATH_MAX];
    DIR *d = opendir(dir);
    if (d) {
        for (struct dirent *e; (e = readdir(d)) != NULL;) {
            if (e->d_type != DT_DIR || e->d_name[0] == '.') continue;
            snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
            rmdir_tree(path);
        }
        closedir(d);
    }
    return rmdir(dir);
}

static int wait_empty(const char *dir, double timeout) {
    double end = now_s() + timeout;
    for (;;) {
        int r = cgroup_empty(dir);
        if (r != 0) return r;
        if (now_s() >= end) return 0;
        sleep_ms(5);
    }
}

static int cmd_kill(int argc, char **argv) {
    static const char use[] = "kill NAME [--signal N] [--timeout SECONDS]";
    const char *name = NULL;
    long long sig = SIGKILL;
    double timeout = 5.0;
    for (int i = 0; i < argc; i++) {
        if (!strcmp(argv[i], "--signal") && i + 1 < argc) {
            if (parse_long(argv[++i], 1, NSIG - 1, &sig)) usage(use);
        } else if (!strcmp(argv[i], "--timeout") && i + 1 < argc) {
            char *end;
            timeout = strtod(argv[++i], &end);
            if (*end || timeout < 0) usage(use);
        } else if (!name && argv[i][0] != '-') {
            name = argv[i];
        } else {
            usage(use);
        }
    }
    if (!name) usage(use);
    if (!valid_cgroup_name(name)) {
        msg("kill %s: invalid cgroup name", name);
        return EXIT_FAIL;
    }
    char dir[PATH_MAX];
    snprintf(dir, sizeof dir, CGROUP_ROOT "/%s", name);
    struct stat st;
    if (stat(dir, &st) < 0) return 0; /* nothing to kill */

    char path[PATH_MAX + 16];
    snprintf(path, sizeof path, "%s/cgroup.kill", dir);
    if (sig == SIGKILL) {
        if (write_file(path, "1") < 0) signal_tree(dir, SIGKILL); /* kernels < 5.14 */
    } else {
        signal_tree(dir, (int)sig);
        if (wait_empty(dir, timeout) == 0) {
            /* the processes outlived the grace period: escalate */
            if (write_file(path, "1") < 0) signal_tree(dir, SIGKILL);
        }
    }
    if (wait_empty(dir, 5.0) != 1) {
        msg("kill %s: processes still running after SIGKILL", name);
        return EXIT_FAIL;
    }
    if (rmdir_tree(dir) < 0 && errno != ENOENT) {
        msg("kill %s: rmdir %s: %s", name, dir, strerror(errno));
        return EXIT_FAIL;
    }
    return 0;
}

/* --------------------------------------------------------------------- fixup */

static int hexval(int c) {
    if (c >= '0' && c <= '9') return c - '0';
    c = tolower(c);
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
}

/* A clone's own identity: the files behind the bind mounts of /etc/machine-id,
 * /etc/hostname and /etc/hosts (init.sh), and the kernel's hostname.  The files are
 * rewritten in place (O_TRUNC), not renamed: a bind mount holds the inode. */
static int set_identity(const char *machine_id, const char *hostname) {
    static const char dir[] = "/run/localsbx";
    char path[64], text[512];
    size_t n = strlen(machine_id), h = strlen(hostname);
    if (n != 32 || strspn(machine_id, "0123456789abcdef") != n) return -2;
    if (h == 0 || h > 63 || hostname[0] == '-' ||
        strspn(hostname, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-") != h)
        return -2;
    const struct { const char *name; const char *fmt; } files[] = {
        {"machine-id", "%s\n"},
        {"hostname", "%s\n"},
        {"hosts", "127.0.0.1\tlocalhost\n127.0.1.1\t%s\n::1\tlocalhost ip6-localhost "
                  "ip6-loopback\nff02::1\tip6-allnodes\nff02::2\tip6-allrouters\n"},
    };
    int rc = 0;
    for (size_t k = 0; k < sizeof files / sizeof files[0]; k++) {
        snprintf(path, sizeof path, "%s/%s", dir, files[k].name);
        snprintf(text, sizeof text, files[k].fmt, k == 0 ? machine_id : hostname);
        int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
        if (fd < 0 || write_all(fd, text, strlen(text)) < 0) {
            msg("%s: %s", path, strerror(errno));
            rc = -1;
        }
        if (fd >= 0) close(fd);
    }
    if (sethostname(hostname, h) < 0) {
        msg("sethostname: %s", strerror(errno));
        rc = -1;
    }
    return rc;
}

static int cmd_fixup(int argc, char **argv) {
    static const char use[] =
        "fixup [--time-ns N] [--entropy HEX] [--machine-id HEX32 --hostname NAME]";
    const char *time_ns = NULL, *entropy = NULL, *machine_id = NULL, *hostname = NULL;
    for (int i = 0; i < argc; i++) {
        if (!strcmp(argv[i], "--time-ns") && i + 1 < argc)
            time_ns = argv[++i];
        else if (!strcmp(argv[i], "--entropy") && i + 1 < argc)
            entropy = argv[++i];
        else if (!strcmp(argv[i], "--machine-id") && i + 1 < argc)
            machine_id = argv[++i];
        else if (!strcmp(argv[i], "--hostname") && i + 1 < argc)
            hostname = argv[++i];
        else
            usage(use);
    }
    if (!time_ns && !entropy && !machine_id) usage(use);
    if (!machine_id != !hostname) usage(use);
    int rc = 0;
    if (machine_id) {
        int r = set_identity(machine_id, hostname);
        if (r == -2) usage(use);
        if (r < 0) rc = EXIT_FAIL;
    }
    if (time_ns) {
        long long ns;
        if (parse_long(time_ns, 0, LLONG_MAX, &ns)) usage(use);
        struct timespec ts = {(time_t)(ns / 1000000000LL), (long)(ns % 1000000000LL)};
        if (clock_settime(CLOCK_REALTIME, &ts) < 0) {
            msg("clock_settime: %s", strerror(errno));
            rc = EXIT_FAIL;
        }
    }
    if (entropy) {
        size_t hexlen = strlen(entropy);
        if (hexlen == 0 || hexlen % 2 || hexlen > 2 * 4096) usage(use);
        size_t n = hexlen / 2;
        struct rand_pool_info *info = calloc(1, sizeof *info + n + 4);
        unsigned char *bytes = (unsigned char *)info->buf;
        for (size_t k = 0; k < n; k++) {
            int hi = hexval(entropy[2 * k]), lo = hexval(entropy[2 * k + 1]);
            if (hi < 0 || lo < 0) usage(use);
            bytes[k] = (unsigned char)(hi << 4 | lo);
        }
        info->entropy_count = (int)(n * 8);
        info->buf_size = (int)n;
        int fd = open("/dev/urandom", O_WRONLY | O_CLOEXEC);
        if (fd < 0) {
            msg("/dev/urandom: %s", strerror(errno));
            return EXIT_FAIL;
        }
        if (ioctl(fd, RNDADDENTROPY, info) < 0) {
            msg("RNDADDENTROPY: %s", strerror(errno));
            rc = EXIT_FAIL;
        } else if (ioctl(fd, RNDRESEEDCRNG) < 0) {
            msg("RNDRESEEDCRNG: %s", strerror(errno));
            rc = EXIT_FAIL;
        }
        close(fd);
        free(info);
    }
    return rc;
}

/* ------------------------------------------------------------------ put, get */

/* The temp file of a put in progress, removed if a signal ends the agent (the SSH
 * session torn down by dropbear), so an interrupted put leaves nothing behind. */
static char put_tmp[PATH_MAX + 32];

static void put_abort(int sig) {
    (void)sig;
    if (put_tmp[0]) unlink(put_tmp);
    _exit(EXIT_FAIL);
}

/* Copy exactly `size` bytes of stdin to out, then require end of input.  Returns 0; -1 with
 * errno (*failed_read says which side); -2 when stdin ended early (*got = bytes read); -3
 * when stdin had more than `size` bytes. */
static int copy_exact(int out, long long size, int *failed_read, long long *got) {
    static char buf[65536];
    long long left = size;
    *got = 0;
    for (;;) {
        size_t want = left > 0 ? (left < (long long)sizeof buf ? (size_t)left : sizeof buf) : 1;
        ssize_t r = read(0, buf, want);
        if (r < 0) {
            if (errno == EINTR) continue;
            *failed_read = 1;
            return -1;
        }
        if (r == 0) return left > 0 ? -2 : 0;
        if (left == 0) return -3;
        if (write_all(out, buf, (size_t)r) < 0) {
            *failed_read = 0;
            return -1;
        }
        left -= r;
        *got += r;
    }
}

static int cmd_put(int argc, char **argv) {
    static const char use[] = "put PATH [--mode OCTAL] [--size BYTES]";
    const char *path = NULL;
    long mode = -1;
    long long size = -1;
    for (int i = 0; i < argc; i++) {
        if (!strcmp(argv[i], "--mode") && i + 1 < argc) {
            char *end;
            mode = strtol(argv[++i], &end, 8);
            if (*end || mode < 0 || mode > 07777) usage(use);
        } else if (!strcmp(argv[i], "--size") && i + 1 < argc) {
            if (parse_long(argv[++i], 0, LLONG_MAX, &size)) usage(use);
        } else if (!path) {
            path = argv[i];
        } else {
            usage(use);
        }
    }
    if (!path || !*path) usage(use);

    char dir[PATH_MAX];
    char *tmp = put_tmp;
    snprintf(dir, sizeof dir, "%s", path);
    char *slash = strrchr(dir, '/');
    if (!slash)
        strcpy(dir, ".");
    else if (slash == dir)
        dir[1] = 0;
    else
        *slash = 0;
    if (mkdir_p(dir, 0755) < 0) {
        msg("put %s: cannot create %s: %s", path, dir, strerror(errno));
        return EXIT_FAIL;
    }
    struct stat old;
    int exists = stat(path, &old) == 0;
    if (exists && S_ISDIR(old.st_mode)) {
        msg("put %s: is a directory", path);
        return EXIT_FAIL;
    }
    struct sigaction sa = {0};
    sa.sa_handler = put_abort;
    sigemptyset(&sa.sa_mask);
    sigaddset(&sa.sa_mask, SIGHUP);
    sigaddset(&sa.sa_mask, SIGTERM);
    sigaddset(&sa.sa_mask, SIGINT);
    sigaddset(&sa.sa_mask, SIGPIPE);
    sigset_t block, prev;
    sigemptyset(&block);
    sigaddset(&block, SIGHUP);
    sigaddset(&block, SIGTERM);
    sigaddset(&block, SIGINT);
    sigaddset(&block, SIGPIPE);
    sigprocmask(SIG_BLOCK, &block, &prev);
    sigaction(SIGHUP, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGPIPE, &sa, NULL);
    snprintf(tmp, sizeof put_tmp, "%s/.localsbx-put.XXXXXX", dir);
    int fd = mkostemp(tmp, O_CLOEXEC);
    if (fd < 0) tmp[0] = 0;
    sigprocmask(SIG_SETMASK, &prev, NULL);
    if (fd < 0) {
        msg("put %s: %s", path, strerror(errno));
        return EXIT_FAIL;
    }
    int failed_read = 0;
    mode_t final_mode = mode >= 0 ? (mode_t)mode : exists ? (old.st_mode & 07777) : 0644;
    if (size >= 0) {
        long long got = 0;
        int rc = copy_exact(fd, size, &failed_read, &got);
        if (rc == -2) {
            msg("put %s: input ended after %lld of %lld bytes (interrupted); %s left unchanged",
                path, got, size, path);
            goto fail;
        }
        if (rc == -3) {
            msg("put %s: more input than the %lld bytes announced; %s left unchanged", path,
                size, path);
            goto fail;
        }
        if (rc < 0) {
            msg("put %s: %s: %s", path, failed_read ? "reading stdin" : "writing",
                strerror(errno));
            goto fail;
        }
    } else if (copy_fd(0, fd, &failed_read) < 0) {
        msg("put %s: %s: %s", path, failed_read ? "reading stdin" : "writing", strerror(errno));
        goto fail;
    }
    if ((exists && fchown(fd, old.st_uid, old.st_gid) < 0) || fchmod(fd, final_mode) < 0) {
        msg("put %s: %s", path, strerror(errno));
        goto fail;
    }
    if (close(fd) < 0) {
        fd = -1;
        msg("put %s: %s", path, strerror(errno));
        goto fail;
    }
    fd = -1;
    sigprocmask(SIG_BLOCK, &block, &prev);
    if (rename(tmp, path) < 0) {
        int e = errno;
        unlink(tmp);
        tmp[0] = 0;
        sigprocmask(SIG_SETMASK, &prev, NULL);
        msg("put %s: %s", path, strerror(e));
        return EXIT_FAIL;
    }
    tmp[0] = 0;
    sigprocmask(SIG_SETMASK, &prev, NULL);
    return 0;
fail:
    sigprocmask(SIG_BLOCK, &block, &prev);
    if (fd >= 0) close(fd);
    unlink(tmp);
    tmp[0] = 0;
    sigprocmask(SIG_SETMASK, &prev, NULL);
    return EXIT_FAIL;
}

static int cmd_get(int argc, char **argv) {
    if (argc != 1) usage("get PATH");
    int fd = open(argv[0], O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        msg("get %s: %s", argv[0], strerror(errno));
        return EXIT_FAIL;
    }
    struct stat st;
    if (fstat(fd, &st) == 0 && S_ISDIR(st.st_mode)) {
        msg("get %s: %s", argv[0], strerror(EISDIR));
        return EXIT_FAIL;
    }
    int failed_read = 0;
    if (copy_fd(fd, 1, &failed_read) < 0) {
        msg("get %s: %s: %s", argv[0], failed_read ? "reading" : "writing stdout", strerror(errno));
        return EXIT_FAIL;
    }
    return 0;
}

/* ------------------------------------------------------------ sync, poweroff */

static int cmd_sync(int argc, char **argv) {
    (void)argv;
    if (argc) usage("sync");
    sync();
    return 0;
}

/* The size of the block device behind MOUNT, in bytes, from sysfs (0 if unknown). */
static unsigned long long device_bytes(const char *mnt) {
    struct stat st;
    if (stat(mnt, &st) < 0) return 0;
    char path[96];
    snprintf(path, sizeof path, "/sys/dev/block/%u:%u/size", major(st.st_dev), minor(st.st_dev));
    FILE *f = fopen(path, "r");
    if (!f) return 0;
    unsigned long long sectors = 0;
    if (fscanf(f, "%llu", &sectors) != 1) sectors = 0;
    fclose(f);
    return sectors * 512ULL;
}

#ifndef EXT4_IOC_RESIZE_FS
#define EXT4_IOC_RESIZE_FS _IOW('f', 16, unsigned long long)
#endif

static int cmd_resizefs(int argc, char **argv) {
    const char *use = "resizefs BYTES [MOUNT]";
    if (argc < 1 || argc > 2) usage(use);
    char *end;
    unsigned long long want = strtoull(argv[0], &end, 10);
    if (*end || !want) usage(use);
    const char *mnt = argc == 2 ? argv[1] : "/";
    /* the host grew the disk a moment ago; the kernel learns it from a config interrupt */
    for (int i = 0; i < 100 && device_bytes(mnt) < want; i++) sleep_ms(100);
    unsigned long long have = device_bytes(mnt);
    if (have < want) {
        msg("resizefs %s: the block device is %llu bytes, not %llu", mnt, have, want);
        return EXIT_FAIL;
    }
    int fd = open(mnt, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    struct statfs sfs;
    if (fd < 0 || fstatfs(fd, &sfs) < 0) {
        msg("resizefs %s: %s", mnt, strerror(errno));
        return EXIT_FAIL;
    }
    unsigned long long blocks = want / (unsigned long long)sfs.f_bsize;
    if (blocks <= (unsigned long long)sfs.f_blocks) return 0;  /* already that big */
    if (ioctl(fd, EXT4_IOC_RESIZE_FS, &blocks) < 0) {
        msg("resizefs %s to %llu blocks: %s", mnt, blocks, strerror(errno));
        return EXIT_FAIL;
    }
    return 0;
}

/* Is PID 1 this agent (`agent init`), or another init it handed over to (systemd)? */
static int pid1_is_agent(void) {
    char exe[PATH_MAX];
    ssize_t n = readlink("/proc/1/exe", exe, sizeof exe - 1);
    if (n <= 0) return 1;
    exe[n] = 0;
    return !strcmp(exe, LIBDIR "/agent");
}

static int cmd_poweroff(int argc, char **argv) {
    (void)argv;
    if (argc) usage("poweroff");
    sync();
    if (getpid() == 1) {
        reboot(RB_POWER_OFF);
        return EXIT_FAIL;
    }
    /* systemd as PID 1: SIGRTMIN+4 is its poweroff (SIGTERM would make it re-execute);
     * it stops the units, unmounts, remounts / read-only and powers off itself */
    int sig = pid1_is_agent() ? SIGTERM : SIGRTMIN + 4;
    /* PID 1 (agent init) does the orderly part: TERM everyone, sync, remount ro, power off.
     * Signal it from a detached child a moment after we exit, so that the SSH server can
     * still report our exit status before PID 1 terminates it. */
    pid_t pid = fork();
    if (pid == 0) {
        setsid();
        int null = open("/dev/null", O_RDWR);
        if (null >= 0) {
            dup2(null, 0);
            dup2(null, 1);
            dup2(null, 2);
        }
        sleep_ms(POWEROFF_DELAY_MS);
        kill(1, sig);
        _exit(0);
    }
    if (pid < 0 && kill(1, sig) < 0) {
        msg("poweroff: %s", strerror(errno));
        return EXIT_FAIL;
    }
    return 0;
}

/* ---------------------------------------------------------------------- init */

static pid_t sshd_pid = -1;

static int write_text(const char *path, const char *text, mode_t mode) {
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode);
    if (fd < 0) return -1;
    size_t len = strlen(text);
    ssize_t n = write(fd, text, len);
    close(fd);
    return n == (ssize_t)len ? 0 : -1;
}

/* In the child that becomes dropbear: a private mount namespace whose /etc is a tmpfs
 * holding only what dropbear's login needs (the `localsbx` account, uid 0, login shell
 * the agent; root likewise; /etc/shells; files-only NSS).  The user's /etc is never
 * written and never read by the management login. */
static int mgmt_namespace(void) {
    struct stat st;
    const char *home = stat("/root", &st) == 0 && S_ISDIR(st.st_mode) ? "/root" : "/";
    char passwd[512];
    if (unshare(CLONE_NEWNS) < 0) return -1;
    if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) < 0) return -1;
    mkdir("/etc", 0755);
    if (mount("localsbx-etc", "/etc", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=64k") < 0)
        return -1;
    snprintf(passwd, sizeof passwd,
             "localsbx:x:0:0:localsbx management:%s:" LIBDIR "/agent\n"
             "root:x:0:0:root:%s:" LIBDIR "/agent\n", home, home);
    if (write_text("/etc/passwd", passwd, 0644) < 0 ||
        write_text("/etc/group", "root:x:0:\n", 0644) < 0 ||
        write_text("/etc/shadow", "localsbx:*:19000:0:99999:7:::\nroot:*:19000:0:99999:7:::\n",
                   0600) < 0 ||
        write_text("/etc/shells", LIBDIR "/agent\n", 0644) < 0 ||
        write_text("/etc/nsswitch.conf", "passwd: files\ngroup: files\nshadow: files\n",
                   0644) < 0)
        return -1;
    return 0;
}

/* Every invocation but PID 1 and the sshd wrapper: run in PID 1's mount namespace (the
 * user's real /etc), also when started from dropbear's private one.  The working
 * directory is kept (setns moves it to the namespace's root). */
static void join_init_namespace(void) {
    char mine[64] = "", init[64] = "", cwd[PATH_MAX];
    ssize_t a = readlink("/proc/self/ns/mnt", mine, sizeof mine - 1);
    ssize_t b = readlink("/proc/1/ns/mnt", init, sizeof init - 1);
    if (a <= 0 || b <= 0 || !strcmp(mine, init)) return;
    int fd = open("/proc/1/ns/mnt", O_RDONLY | O_CLOEXEC);
    if (fd < 0) return;
    int have_cwd = getcwd(cwd, sizeof cwd) != NULL;
    if (setns(fd, CLONE_NEWNS) == 0 && have_cwd && chdir(cwd) < 0 && chdir("/") < 0) {
    }
    close(fd);
}

static pid_t start_sshd(void) {
    struct stat st;
    if (stat(HOST_KEY, &st) < 0 || stat(AUTHKEYS_DIR "/authorized_keys", &st) < 0) {
        console("localsbx: no identity in " RUN_DIR " (was the identity cpio appended to the "
                "initramfs?); management SSH not started\n");
        return -1;
    }
    pid_t pid = fork();
    if (pid != 0) return pid;
    reset_signals();
    setsid();
    int log = open(SSHD_LOG, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
    int null = open("/dev/null", O_RDWR);
    if (null >= 0) dup2(null, 0);
    if (log >= 0) {
        dup2(log, 1);
        dup2(log, 2);
    }
    if (mgmt_namespace() < 0) {
        dprintf(2, "localsbx: management mount namespace: %s\n", strerror(errno));
        _exit(EXIT_FAIL);
    }
    char *args[] = {SSHD_LINK, "-F", "-E", "-s", "-p", SSH_PORT, "-r", HOST_KEY, "-D", AUTHKEYS_DIR,
                    "-P", RUN_DIR "/sshd.pid", NULL};
    char *env[] = {"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", NULL};
    execve(SSHD_LINK, args, env);
    dprintf(2, "localsbx: exec %s: %s\n", SSHD_LINK, strerror(errno));
    _exit(EXIT_CANNOT_EXEC);
}

/* Is something listening on TCP port 10022 (IPv4 or IPv6)? */
static int sshd_listening(void) {
    static const char *files[] = {"/proc/net/tcp", "/proc/net/tcp6"};
    char line[512];
    for (int i = 0; i < 2; i++) {
        FILE *f = fopen(files[i], "re");
        if (!f) continue;
        while (fgets(line, sizeof line, f)) {
            /* "  sl  local_address rem_address   st ..."; LISTEN is state 0A */
            char local[128], remote[128], state[8];
            if (sscanf(line, "%*s %127s %127s %7s", local, remote, state) != 3) continue;
            size_t n = strlen(local);
            if (n > 5 && !strcmp(local + n - 5, ":2726") && !strcmp(state, "0A")) {
                fclose(f);
                return 1;
            }
        }
        fclose(f);
    }
    return 0;
}

static void sshd_log_tail(void) {
    int fd = open(SSHD_LOG, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return;
    off_t size = lseek(fd, 0, SEEK_END);
    off_t from = size > 1024 ? size - 1024 : 0;
    char buf[1025];
    ssize_t n = pread(fd, buf, 1024, from);
    close(fd);
    if (n <= 0) return;
    buf[n] = 0;
    console("localsbx: sshd log tail:\n");
    console(buf);
}

static _Noreturn void shutdown_system(void) {
    console("localsbx: powering off\n");
    kill(-1, SIGTERM);
    double end = now_s() + 3.0;
    while (now_s() < end) {
        pid_t p = waitpid(-1, NULL, WNOHANG);
        if (p < 0 && errno == ECHILD) break;
        if (p <= 0) sleep_ms(10);
    }
    kill(-1, SIGKILL);
    while (waitpid(-1, NULL, WNOHANG) > 0) {
    }
    sync();
    /* a clean ext4: the overlay may be frozen as an image layer after this */
    if (mount(NULL, "/", NULL, MS_REMOUNT | MS_RDONLY, NULL) < 0)
        console("localsbx: remount / read-only failed; syncing only\n");
    sync();
    reboot(RB_POWER_OFF);
    for (;;) pause();
}

/* `init --exec INIT`: PID 1 execs INIT (systemd, which then owns the machine: power
 * off, reaping, shutdown); the forked child keeps the boot kit's part, the management
 * sshd (restarted when it dies) and the READY marker.  When INIT cannot be executed the
 * agent stays PID 1 as without --exec. */
static int keeper = 0;

static void hand_over(const char *init) {
    if (access(init, X_OK) < 0) {
        char line[PATH_MAX + 96];
        snprintf(line, sizeof line, "localsbx: cannot execute %s (%s); the agent stays PID 1\n",
                 init, strerror(errno));
        console(line);
        return;
    }
    pid_t pid = fork();
    if (pid < 0) {
        console("localsbx: fork failed; the agent stays PID 1\n");
        return;
    }
    if (pid == 0) {
        keeper = 1;
        setsid();
        return;
    }
    reset_signals();
    char *args[] = {(char *)init, NULL};
    char *env[] = {"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", NULL};
    execve(init, args, env);
    /* too late to take back the keeper: it runs on, we only reap */
    console("localsbx: exec of the init failed; reaping only\n");
    for (;;)
        if (waitpid(-1, NULL, 0) < 0) pause();
}

static int cmd_init(int argc, char **argv) {
    if (argc == 2 && !strcmp(argv[0], "--exec")) {
        if (getpid() != 1) {
            msg("init must run as PID 1");
            return EXIT_USAGE;
        }
        hand_over(argv[1]);
    } else if (argc) {
        usage("init [--exec INIT]");
    }
    if (getpid() != 1 && !keeper) {
        msg("init must run as PID 1");
        return EXIT_USAGE;
    }
    if (!keeper) reboot(RB_DISABLE_CAD); /* ctrl-alt-del sends SIGINT to us: power off */
    umask(022);
    if (chdir("/") < 0) {
    }
    mkdir(RUN_DIR, 0755);

    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGCHLD);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGPWR);
    sigaddset(&set, SIGHUP);
    sigprocmask(SIG_BLOCK, &set, NULL);

    sshd_pid = start_sshd();
    int ready = 0, failures = 0;
    double next_start = 0;
    for (;;) {
        struct timespec wait = ready || sshd_pid < 0 ? (struct timespec){1, 0}
                                                     : (struct timespec){0, 5000000L};
        int sig = sigtimedwait(&set, NULL, &wait);
        if (keeper && (sig == SIGTERM || sig == SIGINT || sig == SIGPWR)) {
            /* the init is shutting the machine down: stop the sshd and go */
            if (sshd_pid > 0) kill(sshd_pid, SIGTERM);
            _exit(0);
        }
        if (sig == SIGTERM || sig == SIGINT || sig == SIGPWR) shutdown_system();
        int status;
        pid_t p;
        while ((p = waitpid(-1, &status, WNOHANG)) > 0) {
            if (p != sshd_pid) continue;
            char line[128];
            snprintf(line, sizeof line, "localsbx: sshd exited (status 0x%x), restarting\n", status);
            console(line);
            sshd_log_tail();
            sshd_pid = -1;
            failures++;
            next_start = now_s() + (failures < 5 ? 0.1 * failures : 2.0);
        }
        if (sshd_pid < 0 && next_start > 0 && now_s() >= next_start) {
            next_start = 0;
            sshd_pid = start_sshd();
        }
        if (!ready && sshd_pid > 0 && sshd_listening()) {
            ready = 1;
            console(READY_MARKER);
        }
    }
}

/* ---------------------------------------------------------------------- sshd */

/* Run as ".../sshd": start the bundled dropbear through its bundled loader, so the
 * distribution's own ssh packages and libraries can change or go away freely. */
static int run_sshd(int argc, char **argv) {
    char **args = calloc((size_t)argc + 8, sizeof *args);
    int n = 0;
    args[n++] = DROPBEAR_LOADER;
    args[n++] = "--library-path";
    args[n++] = DROPBEAR_DIR;
    args[n++] = "--argv0";
    args[n++] = SSHD_LINK; /* dropbear re-executes argv[0] per connection: come back here */
    args[n++] = DROPBEAR_BIN;
    for (int i = 1; i < argc; i++) args[n++] = argv[i];
    args[n] = NULL;
    execv(DROPBEAR_LOADER, args);
    msg("exec %s: %s", DROPBEAR_LOADER, strerror(errno));
    return EXIT_CANNOT_EXEC;
}

/* ------------------------------------------------------------- login shell */

/* ------------------------------------------------------ spawn, follow, stdin */

/* A background process whose output and exit status live in the guest, not in an SSH
 * channel, so they outlive the supervisor that started it (suspend/resume, re-attach):
 *
 *   DIR/stdout, DIR/stderr  the process's output (appended; on /run, a tmpfs)
 *   DIR/stdin               a FIFO, with --stdin: its input (`agent stdin DIR`)
 *   DIR/pid, DIR/monitor    the process's pid, its monitor's pid
 *   DIR/exit                "exit N" or "signal N" once it ended (written atomically)
 *
 * `spawn` forks a monitor (own session, stdio on /dev/null, outside the command's cgroup)
 * which forks the command (`agent exec EXEC-ARGS` with stdout/stderr on the files), waits
 * for it and writes DIR/exit.  The monitor holds the FIFO's write end until
 * `agent stdin DIR --close` (SIGUSR1), so the command sees end of input only then. */
#define SPAWN_USE "spawn DIR [--stdin] -- EXEC-ARGS..."

static volatile sig_atomic_t stdin_wfd = -1;

static void close_stdin_fd(int sig) {
    (void)sig;
    if (stdin_wfd >= 0) close(stdin_wfd);
    stdin_wfd = -1;
}

static int spawn_path(char *buf, size_t len, const char *dir, const char *name) {
    if ((size_t)snprintf(buf, len, "%s/%s", dir, name) >= len) {
        msg("%s: path too long", dir);
        return -1;
    }
    return 0;
}

static int cmd_spawn(int argc, char **argv) {
    if (argc < 3) usage(SPAWN_USE);
    const char *dir = argv[0];
    int i = 1, want_stdin = 0;
    if (!strcmp(argv[i], "--stdin")) {
        want_stdin = 1;
        i++;
    }
    if (i >= argc || strcmp(argv[i], "--")) usage(SPAWN_USE);
    i++;
    if (i >= argc) usage(SPAWN_USE);
    char out_p[PATH_MAX], err_p[PATH_MAX], in_p[PATH_MAX], pid_p[PATH_MAX], mon_p[PATH_MAX];
    char exit_p[PATH_MAX], tmp_p[PATH_MAX];
    if (spawn_path(out_p, sizeof out_p, dir, "stdout") || spawn_path(err_p, sizeof err_p, dir, "stderr")
        || spawn_path(in_p, sizeof in_p, dir, "stdin") || spawn_path(pid_p, sizeof pid_p, dir, "pid")
        || spawn_path(mon_p, sizeof mon_p, dir, "monitor") || spawn_path(exit_p, sizeof exit_p, dir, "exit")
        || spawn_path(tmp_p, sizeof tmp_p, dir, "exit.tmp"))
        return EXIT_FAIL;
    if (mkdir_p(dir, 0700) < 0) {
        msg("mkdir %s: %s", dir, strerror(errno));
        return EXIT_FAIL;
    }
    int out = open(out_p, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
    int err = open(err_p, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
    if (out < 0 || err < 0) {
        msg("%s: %s", dir, strerror(errno));
        return EXIT_FAIL;
    }
    int rfd = -1, wfd = -1;
    if (want_stdin) {
        if (mkfifo(in_p, 0600) < 0 && errno != EEXIST) {
            msg("mkfifo %s: %s", in_p, strerror(errno));
            return EXIT_FAIL;
        }
        wfd = open(in_p, O_RDWR | O_CLOEXEC); /* never blocks on Linux */
        rfd = wfd < 0 ? -1 : open(in_p, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
        if (rfd < 0 || fcntl(rfd, F_SETFL, 0) < 0) {
            msg("%s: %s", in_p, strerror(errno));
            return EXIT_FAIL;
        }
    }
    int report[2];
    if (pipe2(report, O_CLOEXEC) < 0) {
        msg("pipe: %s", strerror(errno));
        return EXIT_FAIL;
    }
    pid_t mon = fork();
    if (mon < 0) {
        msg("fork: %s", strerror(errno));
        return EXIT_FAIL;
    }
    if (mon > 0) { /* the caller: print the command's pid once the monitor has it */
        close(report[1]);
        if (wfd >= 0) close(wfd);
        if (rfd >= 0) close(rfd);
        char buf[32] = {0};
        ssize_t n = read(report[0], buf, sizeof buf - 1);
        waitpid(mon, NULL, 0);
        if (n <= 0) {
            msg("spawn: the monitor failed");
            return EXIT_FAIL;
        }
        return write_all(1, buf, (size_t)n) < 0 ? EXIT_FAIL : 0;
    }
    /* the monitor: leave the SSH session, fork again so the caller can reap us at once */
    close(report[0]);
    setsid();
    if (fork() != 0) _exit(0);
    int null = open("/dev/null", O_RDWR);
    if (null >= 0) {
        dup2(null, 0);
        dup2(null, 1);
        dup2(null, 2);
        if (null > 2) close(null);
    }
    signal(SIGHUP, SIG_IGN);
    signal(SIGPIPE, SIG_IGN);
    pid_t child = fork();
    if (child == 0) {
        close(report[1]);
        dup2(out, 1);
        dup2(err, 2);
        if (rfd >= 0) dup2(rfd, 0);
        signal(SIGHUP, SIG_DFL);
        signal(SIGPIPE, SIG_DFL);
        /* agent exec EXEC-ARGS (its --stdin keeps fd 0, the FIFO) */
        int n = argc - i;
        _exit(cmd_exec(n, argv + i));
    }
    close(out);
    close(err);
    if (rfd >= 0) close(rfd);
    char buf[32];
    snprintf(buf, sizeof buf, "%d\n", (int)getpid());
    write_text(mon_p, buf, 0600);
    if (child > 0) {
        int len = snprintf(buf, sizeof buf, "%d\n", (int)child);
        write_text(pid_p, buf, 0600);
        write_all(report[1], buf, (size_t)len);
    }
    close(report[1]);
    int status = 0;
    if (child > 0) {
        stdin_wfd = wfd;
        struct sigaction sa = {0};
        sa.sa_handler = close_stdin_fd;
        sigaction(SIGUSR1, &sa, NULL);
        while (waitpid(child, &status, 0) < 0 && errno == EINTR) {
        }
    } else {
        status = EXIT_CANNOT_EXEC << 8;
    }
    close_stdin_fd(0);
    if (WIFSIGNALED(status))
        snprintf(buf, sizeof buf, "signal %d\n", WTERMSIG(status));
    else
        snprintf(buf, sizeof buf, "exit %d\n", WEXITSTATUS(status));
    if (write_text(tmp_p, buf, 0600) == 0) rename(tmp_p, exit_p);
    _exit(0);
}

/* Copy DIR/stdout to fd 1 and DIR/stderr to fd 2 from the given offsets, following them
 * until DIR/exit exists and both are drained (exit 0), or until our stdin (the SSH
 * channel) ends: a follower whose supervisor went away does not linger. */
static int follow_pass(int fd, int out) {
    char buf[65536];
    for (;;) {
        ssize_t n = read(fd, buf, sizeof buf);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return 0;
        if (write_all(out, buf, (size_t)n) < 0) return -1;
    }
}

static int cmd_follow(int argc, char **argv) {
    static const char use[] = "follow DIR STDOUT-OFFSET STDERR-OFFSET";
    long long off[2];
    if (argc != 3 || parse_long(argv[1], 0, LLONG_MAX, &off[0])
        || parse_long(argv[2], 0, LLONG_MAX, &off[1]))
        usage(use);
    char paths[3][PATH_MAX];
    if (spawn_path(paths[0], PATH_MAX, argv[0], "stdout") || spawn_path(paths[1], PATH_MAX, argv[0], "stderr")
        || spawn_path(paths[2], PATH_MAX, argv[0], "exit"))
        return EXIT_FAIL;
    int fds[2];
    for (int k = 0; k < 2; k++) {
        fds[k] = open(paths[k], O_RDONLY | O_CLOEXEC);
        if (fds[k] < 0 || lseek(fds[k], (off_t)off[k], SEEK_SET) < 0) {
            msg("follow %s: %s", paths[k], strerror(errno));
            return EXIT_FAIL;
        }
    }
    for (;;) {
        int ended = access(paths[2], F_OK) == 0;
        for (int k = 0; k < 2; k++)
            if (follow_pass(fds[k], k + 1) < 0) return EXIT_FAIL;
        if (ended) return 0;
        struct pollfd p = {.fd = 0, .events = POLLIN};
        int r = poll(&p, 1, 100);
        if (r > 0) {
            char c[256];
            ssize_t n = read(0, c, sizeof c);
            if (n <= 0) return 0; /* the channel is gone */
        }
    }
}

/* `stdin DIR`: our stdin -> the process's FIFO; `stdin DIR --close`: end its input. */
static int cmd_stdin(int argc, char **argv) {
    static const char use[] = "stdin DIR [--close]";
    if (argc < 1 || argc > 2 || (argc == 2 && strcmp(argv[1], "--close"))) usage(use);
    char p[PATH_MAX];
    if (argc == 2) {
        if (spawn_path(p, sizeof p, argv[0], "monitor")) return EXIT_FAIL;
        int fd = open(p, O_RDONLY | O_CLOEXEC);
        char buf[32] = {0};
        long long pid = 0;
        ssize_t n = fd < 0 ? -1 : read(fd, buf, sizeof buf - 1);
        if (fd >= 0) close(fd);
        if (n > 0 && buf[n - 1] == '\n') buf[n - 1] = 0;
        if (n <= 0 || parse_long(buf, 2, INT_MAX, &pid) || kill((pid_t)pid, SIGUSR1) < 0) {
            msg("stdin %s --close: %s", argv[0], n <= 0 ? "no monitor" : strerror(errno));
            return EXIT_FAIL;
        }
        return 0;
    }
    if (spawn_path(p, sizeof p, argv[0], "stdin")) return EXIT_FAIL;
    /* O_NONBLOCK: ENXIO at once when nothing reads it (the process ended) */
    int fd = open(p, O_WRONLY | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0 || fcntl(fd, F_SETFL, 0) < 0) {
        msg("stdin %s: %s", p, strerror(errno));
        return EXIT_FAIL;
    }
    signal(SIGPIPE, SIG_IGN);
    int failed_read = 0;
    if (copy_fd(0, fd, &failed_read) < 0) {
        msg("stdin %s: %s", p, strerror(errno));
        return EXIT_FAIL;
    }
    return 0;
}

int main(int argc, char **argv);

/* Split a command line the way a POSIX shell splits simple words: blanks separate,
 * '...' is literal, "..." allows \\ \" \$ \` escapes, a backslash outside quotes escapes
 * the next character.  Enough for what the host sends (shlex.join output); anything with
 * other shell syntax ($, `, ;, |, &, <, >, (, )) outside quotes is refused. */
static char **split_words(const char *line, int *count) {
    size_t len = strlen(line);
    char **words = calloc(len / 2 + 2, sizeof *words);
    char *buf = malloc(len + 1);
    int n = 0;
    const char *p = line;
    if (!words || !buf) return NULL;
    for (;;) {
        while (*p == ' ' || *p == '\t' || *p == '\n') p++;
        if (!*p) break;
        char *w = buf, *start = buf;
        while (*p && *p != ' ' && *p != '\t' && *p != '\n') {
            if (*p == '\'') {
                const char *q = strchr(p + 1, '\'');
                if (!q) return NULL;
                memcpy(w, p + 1, (size_t)(q - p - 1));
                w += q - p - 1;
                p = q + 1;
            } else if (*p == '"') {
                for (p++; *p && *p != '"'; p++) {
                    if (*p == '\\' && strchr("\\\"$`", p[1])) p++;
                    else if (*p == '$' || *p == '`') return NULL;
                    *w++ = *p;
                }
                if (*p != '"') return NULL;
                p++;
            } else if (*p == '\\' && p[1]) {
                *w++ = p[1];
                p += 2;
            } else if (strchr("$`;|&<>()", *p)) {
                return NULL;
            } else {
                *w++ = *p++;
            }
        }
        *w++ = '\0';
        words[n++] = start;
        buf = w;
    }
    words[n] = NULL;
    *count = n;
    return words;
}

/* Invoked by the management SSH server as the login shell of the `localsbx` account
 * (uid 0): `agent -c 'exec /usr/lib/localsbx/agent VERB ARGS...'`.  No bash, no rc
 * files: nothing in the user's image can change what the host's commands do. */
static int login_shell(const char *line) {
    int n = 0;
    char **w = split_words(line, &n);
    if (!w) {
        msg("management shell: unsupported command line");
        return EXIT_USAGE;
    }
    int i = 0;
    if (i < n && !strcmp(w[i], "exec")) i++;
    if (i < n && !strcmp(w[i], LIBDIR "/agent")) i++;
    if (i >= n) {
        msg("management shell: no verb");
        return EXIT_USAGE;
    }
    char *argv[n - i + 2];
    argv[0] = LIBDIR "/agent";
    for (int k = i; k < n; k++) argv[k - i + 1] = w[k];
    argv[n - i + 1] = NULL;
    return main(n - i + 1, argv);
}

/* ---------------------------------------------------------------------- main */

int main(int argc, char **argv) {
    const char *base = argc > 0 ? strrchr(argv[0], '/') : NULL;
    base = base ? base + 1 : (argc > 0 ? argv[0] : "");
    if (!strcmp(base, "sshd")) return run_sshd(argc, argv);
    if (getpid() != 1) join_init_namespace();
    if (argc == 3 && !strcmp(argv[1], "-c")) return login_shell(argv[2]);

    if (argc < 2) usage("agent init|exec|kill|fixup|put|get|spawn|follow|stdin|sync|poweroff ...");
    const char *verb = argv[1];
    int n = argc - 2;
    char **rest = argv + 2;
    if (!strcmp(verb, "exec")) return cmd_exec(n, rest);
    if (!strcmp(verb, "kill")) return cmd_kill(n, rest);
    if (!strcmp(verb, "fixup")) return cmd_fixup(n, rest);
    if (!strcmp(verb, "put")) return cmd_put(n, rest);
    if (!strcmp(verb, "get")) return cmd_get(n, rest);
    if (!strcmp(verb, "sync")) return cmd_sync(n, rest);
    if (!strcmp(verb, "resizefs")) return cmd_resizefs(n, rest);
    if (!strcmp(verb, "poweroff")) return cmd_poweroff(n, rest);
    if (!strcmp(verb, "init")) return cmd_init(n, rest);
    if (!strcmp(verb, "spawn")) return cmd_spawn(n, rest);
    if (!strcmp(verb, "follow")) return cmd_follow(n, rest);
    if (!strcmp(verb, "stdin")) return cmd_stdin(n, rest);
    msg("unknown verb %s", verb);
    usage("agent init|exec|kill|fixup|put|get|spawn|follow|stdin|sync|poweroff ...");
}
