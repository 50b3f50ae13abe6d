using System.Diagnostics;
using OffloadRpc.Fuzz.Targets;

namespace OffloadRpc.Fuzz;

/// <summary>
/// The command line. <c>(target)</c>: one input per AFL++ run on stdin (persistent: SharpFuzz's
/// forkserver loop); <c>replay (target|all) [path...]</c>: files or corpus folders in-process;
/// <c>smoke [corpus] [mutations] [seed]</c>: every seed plus deterministic mutations through every
/// target; <c>generate [corpus]</c>: writes the seed corpus; <c>list</c>.
/// </summary>
public static class FuzzProgram
{
    public static int Main(string[] args)
    {
        // An assertion is a finding, reported like any crash: Debug.Assert goes through the trace listeners.
        Trace.Listeners.Clear();
        Trace.Listeners.Add(new ThrowingListener());
        if (args.Length == 0)
        {
            Console.Error.WriteLine("usage: OffloadRpc.Fuzz (target) | replay (target|all) [path...] | smoke [corpus] [mutations] [seed] | generate [corpus] | list");
            return 2;
        }

        string corpus = DefaultCorpus();
        switch (args[0])
        {
            case "assert-selftest":
                Debug.Assert(false, "the fuzzer reports assertions");
                return 0;

            case "list":
                foreach (FuzzTarget target in FuzzTarget.All)
                {
                    Console.WriteLine($"{target.Name,-10} {target.Description}");
                }

                return 0;

            case "generate":
                return Generate(args.Length > 1 ? args[1] : corpus);

            case "replay":
                return Replay(args.Length > 1 ? args[1] : "all", args.Length > 2 ? args[2..] : [corpus]);

            case "smoke":
            {
                var failures = SmokeRun.Run(
                    args.Length > 1 ? args[1] : corpus,
                    args.Length > 2 ? int.Parse(args[2], System.Globalization.CultureInfo.InvariantCulture) : 600,
                    args.Length > 3 ? int.Parse(args[3], System.Globalization.CultureInfo.InvariantCulture) : 12,
                    Console.Out);
                return failures.Count == 0 ? 0 : 1;
            }

            default:
            {
                string name = args[0];
                if (!TargetNames.Contains(name))
                {
                    Console.Error.WriteLine($"unknown target '{name}'; try list");
                    return 2;
                }

                // No instrumented code may run before Fuzzer.Run has attached AFL's coverage map (the runtime's
                // and the contracts' static constructors and module initializers included): the target is
                // looked up inside the loop.
                FuzzTarget? target = null;
                SharpFuzz.Fuzzer.Run(stream =>
                {
                    using var buffer = new MemoryStream();
                    stream.CopyTo(buffer);
                    target ??= FuzzTarget.Find(name)!;
                    target.Run(buffer.ToArray());
                });
                return 0;
            }
        }
    }

    /// <summary>The targets' names, known without touching their (instrumented) dependencies.</summary>
    public static readonly string[] TargetNames = ["handshake", "frames", "ring", "stub", "reply", "metadata", "grpc"];

    /// <summary>tests/OffloadRpc.Fuzz/corpus, found from the working folder or the program's own.</summary>
    public static string DefaultCorpus()
    {
        foreach (string start in new[] { Directory.GetCurrentDirectory(), AppContext.BaseDirectory })
        {
            for (DirectoryInfo? dir = new(start); dir is not null; dir = dir.Parent)
            {
                foreach (string candidate in new[] { Path.Combine(dir.FullName, "corpus"), Path.Combine(dir.FullName, "tests", "OffloadRpc.Fuzz", "corpus") })
                {
                    if (Directory.Exists(candidate) && File.Exists(Path.Combine(Path.GetDirectoryName(candidate)!, "fuzz.sh")))
                    {
                        return candidate;
                    }
                }
            }
        }

        return Path.Combine(Directory.GetCurrentDirectory(), "corpus");
    }

    private static int Generate(string corpus)
    {
        foreach (FuzzTarget target in FuzzTarget.All)
        {
            string folder = Path.Combine(corpus, target.Name);
            Directory.CreateDirectory(folder);
            int written = 0;
            foreach ((string name, byte[] data) in target.Seeds())
            {
                File.WriteAllBytes(Path.Combine(folder, "seed-" + name), data);
                written++;
            }

            Console.WriteLine($"{target.Name}: {written} seeds in {folder}");
        }

        return 0;
    }

    private static int Replay(string which, string[] paths)
    {
        int failed = 0;
        int run = 0;
        foreach (FuzzTarget target in which == "all" ? FuzzTarget.All : [FuzzTarget.Find(which) ?? throw new ArgumentException("unknown target " + which)])
        {
            foreach (string file in Files(paths, which == "all" ? target.Name : null))
            {
                run++;
                try
                {
                    target.Run(File.ReadAllBytes(file));
                }
                catch (Exception ex)
                {
                    failed++;
                    Console.WriteLine($"FAIL {target.Name} {file}: {ex}");
                }
            }
        }

        GC.Collect();
        GC.WaitForPendingFinalizers();
        Console.WriteLine($"{run} inputs replayed, {failed} failed; afterwards {Directory.GetFiles("/proc/self/fd").Length} descriptors open, " +
            $"{Directory.GetDirectories("/proc/self/task").Length} threads, {Transport.RpcConnection.PeerMappedBytes} bytes of peer segments mapped");
        if (Environment.GetEnvironmentVariable("OFFLOADRPC_FUZZ_VERBOSE") == "1")
        {
            foreach (string fd in Directory.GetFiles("/proc/self/fd"))
            {
                try
                {
                    string? target = new FileInfo(fd).LinkTarget;
                    if (target is not null && (target.StartsWith("/memfd:", StringComparison.Ordinal) || target.StartsWith("socket:", StringComparison.Ordinal)))
                    {
                        Console.WriteLine($"  fd {Path.GetFileName(fd)} -> {target}");
                    }
                }
                catch (IOException)
                {
                }
            }
        }
        return failed == 0 ? 0 : 1;
    }

    /// <summary>The files named, and those in the folders named (for "all", each target's own subfolder of a corpus).</summary>
    private static IEnumerable<string> Files(string[] paths, string? subfolder)
    {
        foreach (string path in paths)
        {
            string folder = subfolder is null ? path : Path.Combine(path, subfolder);
            if (Directory.Exists(folder))
            {
                foreach (string file in Directory.GetFiles(folder).Order(StringComparer.Ordinal))
                {
                    yield return file;
                }
            }
            else if (File.Exists(path) && subfolder is null)
            {
                yield return path;
            }
        }
    }

    private sealed class ThrowingListener : TraceListener
    {
        public override void Fail(string? message, string? detailMessage) => throw new AssertionFailedException(message + (detailMessage is null ? string.Empty : " " + detailMessage));

        public override void Write(string? message)
        {
        }

        public override void WriteLine(string? message)
        {
        }
    }
}
