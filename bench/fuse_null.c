/*
 * fuse_null: the kernel FUSE ceiling for bench_multi.py.
 *
 * What the kernel's FUSE client and fio cost on this machine when the
 * server does no work: a multi-threaded libfuse3 low-level server with N
 * files of 128 MiB that answers READ with zeros (from one static buffer)
 * and WRITE with its size, and nothing is stored.  Built by bench_multi.py
 * into its scratch directory:
 *
 *     gcc -O2 fuse_null.c $(pkg-config --cflags --libs fuse3) -lpthread
 *
 * Usage: fuse_null MOUNTPOINT NFILES THREADS [-o OPTION]...
 *
 * Files are named 0 .. NFILES-1.  What matters for the comparison is set
 * as evscrypt's daemon sets it: one mount for all files, default_permissions
 * and allow_other, keep_cache and no direct_io on open (ops.py), attribute
 * and entry timeouts of 1 s, auto_inval_data and splice reads off,
 * max_background 256 with congestion_threshold at 3/4 of it (the cfilter
 * patch), THREADS workers (evscrypt: two per core) each receiving and
 * answering on the one /dev/fuse fd.  Unlike evscrypt's workers they
 * block in read(2) and never spin.  Extra -o options go to libfuse (e.g.
 * -o io_uring with a libfuse that has it; then libfuse's own multi-threaded
 * loop runs, since the io_uring queues are libfuse's threads).
 *
 * SIGTERM or SIGINT unmounts and exits 0.
 */
#define FUSE_USE_VERSION 312 /* fuse_loop_cfg_*: libfuse 3.12 or later */
#include <fuse_lowlevel.h>

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define FILE_SIZE (128LL << 20)
#define ATTR_TIMEOUT 1.0
#define MAX_BACKGROUND 256
#define ZEROS_SIZE (1 << 20) /* above any max_read the kernel asks for */

static const char zeros[ZEROS_SIZE];
static unsigned long nfiles;
static struct fuse_session *se;

/* Inode 1 is the root; file i has inode i + 2. */
static int file_of(fuse_ino_t ino) { return ino >= 2 && ino - 2 < nfiles ? (int)(ino - 2) : -1; }

static void attr_of(fuse_ino_t ino, struct stat *st)
{
	memset(st, 0, sizeof(*st));
	st->st_ino = ino;
	if (ino == FUSE_ROOT_ID) {
		st->st_mode = S_IFDIR | 0755;
		st->st_nlink = 2;
	} else {
		st->st_mode = S_IFREG | 0600;
		st->st_nlink = 1;
		st->st_size = FILE_SIZE;
		st->st_blksize = 4096;
		st->st_blocks = FILE_SIZE / 512;
	}
}

static void null_init(void *userdata, struct fuse_conn_info *conn)
{
	(void)userdata;
	/* As pyfuse3 for evscrypt (ops.py): with auto_inval_data the kernel
	 * asks for the attributes before every read that follows a write. */
	conn->want &= ~(FUSE_CAP_AUTO_INVAL_DATA | FUSE_CAP_SPLICE_READ);
	conn->max_background = MAX_BACKGROUND;
	conn->congestion_threshold = MAX_BACKGROUND * 3 / 4;
}

static void null_lookup(fuse_req_t req, fuse_ino_t parent, const char *name)
{
	struct fuse_entry_param e;
	char *end;
	unsigned long i = strtoul(name, &end, 10);

	if (parent != FUSE_ROOT_ID || *name == '\0' || *end != '\0' || i >= nfiles) {
		fuse_reply_err(req, ENOENT);
		return;
	}
	memset(&e, 0, sizeof(e));
	e.ino = i + 2;
	e.attr_timeout = e.entry_timeout = ATTR_TIMEOUT;
	attr_of(e.ino, &e.attr);
	fuse_reply_entry(req, &e);
}

static void null_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	struct stat st;

	(void)fi;
	if (ino != FUSE_ROOT_ID && file_of(ino) < 0) {
		fuse_reply_err(req, ENOENT);
		return;
	}
	attr_of(ino, &st);
	fuse_reply_attr(req, &st, ATTR_TIMEOUT);
}

static void null_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	if (file_of(ino) < 0) {
		fuse_reply_err(req, EISDIR);
		return;
	}
	fi->keep_cache = 1;
	fuse_reply_open(req, fi);
}

static void null_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi)
{
	(void)ino; (void)fi;
	if (off >= FILE_SIZE)
		size = 0;
	else if ((long long)size > FILE_SIZE - off)
		size = FILE_SIZE - off;
	fuse_reply_buf(req, zeros, size < ZEROS_SIZE ? size : ZEROS_SIZE);
}

static void null_write(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size, off_t off,
		       struct fuse_file_info *fi)
{
	(void)ino; (void)buf; (void)off; (void)fi;
	fuse_reply_write(req, size);
}

static const struct fuse_lowlevel_ops ops = {
	.init = null_init,
	.lookup = null_lookup,
	.getattr = null_getattr,
	.open = null_open,
	.read = null_read,
	.write = null_write,
};

/* One worker: receive a request, answer it, until the session ends. */
static void *worker(void *arg)
{
	struct fuse_buf buf = { .mem = NULL };
	int res;

	(void)arg;
	while (!fuse_session_exited(se)) {
		res = fuse_session_receive_buf(se, &buf);
		if (res == -EINTR || res == -EAGAIN)
			continue;
		if (res <= 0)
			break; /* 0 or -ENODEV: unmounted */
		fuse_session_process_buf(se, &buf);
	}
	free(buf.mem);
	return NULL;
}

/* libfuse's loop (needed for -o io_uring); ends when the signal handler
 * libfuse installs sees SIGTERM or SIGINT. */
static int run_libfuse_loop(int threads)
{
	struct fuse_loop_config *cfg = fuse_loop_cfg_create();
	int res;

	fuse_loop_cfg_set_max_threads(cfg, threads);
	fuse_loop_cfg_set_idle_threads(cfg, threads);
	if (fuse_set_signal_handlers(se) != 0)
		return 1;
	res = fuse_session_loop_mt(se, cfg);
	fuse_remove_signal_handlers(se);
	fuse_loop_cfg_destroy(cfg);
	return res < 0 ? 1 : 0;
}

/* evscrypt's shape: a fixed pool of workers on the one fd; the main thread
 * waits for SIGTERM or SIGINT, then unmounts, which ends the workers' reads. */
static int run_workers(int threads)
{
	pthread_t tid[256];
	sigset_t set;
	int i, sig;

	sigemptyset(&set);
	sigaddset(&set, SIGTERM);
	sigaddset(&set, SIGINT);
	pthread_sigmask(SIG_BLOCK, &set, NULL); /* the workers inherit the mask */
	for (i = 0; i < threads; i++)
		if (pthread_create(&tid[i], NULL, worker, NULL) != 0) {
			perror("fuse_null: pthread_create");
			threads = i;
			break;
		}
	sigwait(&set, &sig);
	fuse_session_exit(se);
	fuse_session_unmount(se);
	for (i = 0; i < threads; i++)
		pthread_join(tid[i], NULL);
	return 0;
}

int main(int argc, char **argv)
{
	struct fuse_args args = FUSE_ARGS_INIT(0, NULL);
	int threads, i, res, own_loop = 1;

	if (argc < 4 || (argc - 4) % 2 != 0) {
		fprintf(stderr, "usage: %s MOUNTPOINT NFILES THREADS [-o OPTION]...\n", argv[0]);
		return 2;
	}
	nfiles = strtoul(argv[2], NULL, 10);
	threads = atoi(argv[3]);
	if (nfiles < 1 || threads < 1 || threads > 256) {
		fprintf(stderr, "fuse_null: NFILES >= 1 and 1 <= THREADS <= 256\n");
		return 2;
	}
	fuse_opt_add_arg(&args, argv[0]);
	fuse_opt_add_arg(&args, "-o");
	fuse_opt_add_arg(&args, "default_permissions,allow_other,fsname=fuse-null,subtype=fuse-null");
	for (i = 4; i < argc; i += 2) {
		fuse_opt_add_arg(&args, argv[i]);
		fuse_opt_add_arg(&args, argv[i + 1]);
		if (strstr(argv[i + 1], "io_uring"))
			own_loop = 0;
	}
	se = fuse_session_new(&args, &ops, sizeof(ops), NULL);
	fuse_opt_free_args(&args);
	if (se == NULL)
		return 1;
	if (fuse_session_mount(se, argv[1]) != 0) {
		fuse_session_destroy(se);
		return 1;
	}
	res = own_loop ? run_workers(threads) : run_libfuse_loop(threads);
	if (!own_loop)
		fuse_session_unmount(se);
	fuse_session_destroy(se);
	return res;
}
