using System.Collections.Concurrent;
using System.Diagnostics;
using System.Globalization;
using System.Runtime.InteropServices;
using System.Text;
using System.Threading.Channels;

namespace OffloadRpc.Cli;

/// <summary>What one client process measured in a window, and its CPU time over it.</summary>
internal sealed record ClientWindow(int ProcessId, long Calls, double P50Microseconds, double P99Microseconds, double MaxMicroseconds, double CpuPercent, double LateMicroseconds);

/// <summary>One window of a fleet: every client's figures, the server's CPU time and its most threads seen.</summary>
internal sealed record FleetWindow(double Seconds, IReadOnlyList<ClientWindow> Clients, double ServerCpuPercent, int ServerThreads);

/// <summary>
/// Client processes of a many-clients run, each a <see cref="LoadClient"/>, started and ended by this
/// class: every one by its own process id, on disposal, on failure, and (through
/// <see cref="ChildProcesses"/>) on Ctrl+C. Every step waits for every client within a deadline, the
/// run's watchdog: a client that stops answering (its calls hang, its server died) fails the run with
/// its pid and the step instead of hanging it. The peer benchmark links this file.
/// </summary>
internal sealed class ClientFleet : IAsyncDisposable
{
    private static readonly TimeSpan StepTimeout = TimeSpan.FromSeconds(60);

    private readonly List<Child> _children = [];
    private readonly Task _serverExited;
    private volatile bool _failed;

    private ClientFleet(Task serverExited) => _serverExited = serverExited;

    public int Count => _children.Count;

    public IEnumerable<int> ProcessIds => _children.Select(c => c.Process.Id);

    /// <summary>
    /// Starts <paramref name="count"/> client processes at once and waits until every one has
    /// printed READY (connected). <paramref name="serverExited"/> completes if the server dies: every
    /// wait then fails at once.
    /// </summary>
    public static async Task<ClientFleet> StartAsync(int count, Func<int, ProcessStartInfo> startInfo, Task serverExited)
    {
        var fleet = new ClientFleet(serverExited);
        try
        {
            for (int i = 0; i < count; i++)
            {
                ProcessStartInfo info = startInfo(i);
                info.UseShellExecute = false;
                info.RedirectStandardInput = true;
                info.RedirectStandardOutput = true;
                info.RedirectStandardError = true;
                fleet._children.Add(new Child(ChildProcesses.Start(info)));
            }

            TimeSpan startup = StepTimeout + TimeSpan.FromSeconds(count); // many runtimes starting at once on few cores
            await AllAsync(fleet._children.Select(c => fleet.ExpectAsync(c, "READY", "connecting", startup)));
            foreach (Child child in fleet._children)
            {
                child.Cpu = ProcessCpu.Of(child.Process.Id);
            }

            return fleet;
        }
        catch
        {
            await fleet.DisposeAsync();
            throw;
        }
    }

    /// <summary>
    /// One window: every client calls <paramref name="op"/> for <paramref name="warmUp"/>; once all
    /// are warm they get a window starting far enough ahead that each has it in time; the CPU time of
    /// the server and of every client is read from their CPU clocks at its start and end, the server's
    /// thread count at its start, middle and end.
    /// </summary>
    public async Task<FleetWindow> MeasureAsync(string op, TimeSpan warmUp, TimeSpan window, int serverProcessId)
    {
        ProcessCpu serverCpu = ProcessCpu.Of(serverProcessId);
        Send($"RUN {op} {(long)warmUp.TotalMilliseconds}");
        await AllAsync(_children.Select(c => ExpectAsync(c, "WARM", $"warming up {op}", warmUp + StepTimeout)));

        long margin = Stopwatch.Frequency / 4 + (Stopwatch.Frequency / 100 * _children.Count); // the GO line must reach every client before t0
        long t0 = Stopwatch.GetTimestamp() + margin;
        long t1 = t0 + (long)(window.TotalSeconds * Stopwatch.Frequency);
        Send(string.Create(CultureInfo.InvariantCulture, $"GO {t0} {t1}"));

        await DelayUntilAsync(t0);
        long wall0 = Stopwatch.GetTimestamp();
        long server0 = Read(serverCpu, $"the server {serverProcessId}");
        long[] clients0 = _children.Select(c => Read(c.Cpu!, $"client {c.Process.Id}")).ToArray();
        int threads = ProcessThreads.Count(serverProcessId);
        await DelayUntilAsync(t0 + ((t1 - t0) / 2));
        threads = Math.Max(threads, ProcessThreads.Count(serverProcessId));
        await DelayUntilAsync(t1);
        long server1 = Read(serverCpu, $"the server {serverProcessId}");
        long[] clients1 = _children.Select(c => Read(c.Cpu!, $"client {c.Process.Id}")).ToArray();
        long wall1 = Stopwatch.GetTimestamp();
        threads = Math.Max(threads, ProcessThreads.Count(serverProcessId));

        string[] results = await AllAsync(_children.Select(c => ExpectAsync(c, "RESULT", $"measuring {op}", StepTimeout)));
        double wallNanoseconds = (wall1 - wall0) * 1e9 / Stopwatch.Frequency;
        var clients = new ClientWindow[_children.Count];
        for (int i = 0; i < clients.Length; i++)
        {
            double[] f = results[i].Split(' ', StringSplitOptions.RemoveEmptyEntries).Skip(1).Select(s => double.Parse(s, CultureInfo.InvariantCulture)).ToArray();
            if (f.Length != 5)
            {
                throw new InvalidDataException($"client {_children[i].Process.Id} sent a malformed result: '{results[i]}'");
            }

            clients[i] = new ClientWindow(_children[i].Process.Id, (long)f[0], f[1], f[2], f[3], (clients1[i] - clients0[i]) / wallNanoseconds * 100, f[4]);
        }

        return new FleetWindow((t1 - t0) / (double)Stopwatch.Frequency, clients, (server1 - server0) / wallNanoseconds * 100, threads);
    }

    private long Read(ProcessCpu cpu, string who)
    {
        try
        {
            return cpu.Nanoseconds;
        }
        catch (InvalidOperationException)
        {
            _failed = true;
            throw new InvalidOperationException($"{who} exited during the window");
        }
    }

    /// <summary>CPU time of every client over a span in which they do nothing (idle connections), as % of a core each.</summary>
    public double[] CpuPercent(long[] start, long startTimestamp) => _children.Select((c, i) => (c.Cpu!.Nanoseconds - start[i]) / ((Stopwatch.GetTimestamp() - startTimestamp) * 1e9 / Stopwatch.Frequency) * 100).ToArray();

    /// <summary>Every client's CPU clock now, for <see cref="CpuPercent"/>.</summary>
    public long[] CpuNanoseconds() => _children.Select(c => c.Cpu!.Nanoseconds).ToArray();

    private void Send(string line)
    {
        foreach (Child child in _children)
        {
            child.Process.StandardInput.WriteLine(line);
            child.Process.StandardInput.Flush();
        }
    }

    /// <summary>Every answer, in order; the first failure fails at once (Task.WhenAll would wait for the slowest client first).</summary>
    private static async Task<string[]> AllAsync(IEnumerable<Task<string>> answers)
    {
        Task<string>[] all = answers.ToArray();
        var pending = new HashSet<Task<string>>(all);
        while (pending.Count > 0)
        {
            Task<string> done = await Task.WhenAny(pending);
            pending.Remove(done);
            await done; // throws its failure now
        }

        return all.Select(t => t.Result).ToArray();
    }

    private static async Task DelayUntilAsync(long timestamp)
    {
        long remaining = timestamp - Stopwatch.GetTimestamp();
        if (remaining > 0)
        {
            await Task.Delay(TimeSpan.FromSeconds(remaining / (double)Stopwatch.Frequency));
        }

        while (Stopwatch.GetTimestamp() < timestamp)
        {
            await Task.Yield(); // Task.Delay may wake a little early; never sample before the window begins
        }
    }

    /// <summary>The child's next line, which must start with <paramref name="word"/>; an ERROR line, its exit, the server's exit or the deadline fail the run.</summary>
    private async Task<string> ExpectAsync(Child child, string word, string step, TimeSpan timeout)
    {
        try
        {
            return await NextLineAsync(child, word, step, timeout);
        }
        catch
        {
            _failed = true; // disposal then kills every client at once instead of asking them to leave
            throw;
        }
    }

    private async Task<string> NextLineAsync(Child child, string word, string step, TimeSpan timeout)
    {
        using var deadline = new CancellationTokenSource(timeout);
        Task<bool> next = child.Lines.Reader.WaitToReadAsync(deadline.Token).AsTask();
        Task first = await Task.WhenAny(next, _serverExited);
        if (first == _serverExited)
        {
            throw new InvalidOperationException($"the server exited while the clients were {step}");
        }

        bool more;
        try
        {
            more = await next;
        }
        catch (OperationCanceledException)
        {
            throw new TimeoutException($"client {child.Process.Id} did not answer within {timeout.TotalSeconds:0} s while {step} (watchdog): the run is stopped");
        }

        if (!more || !child.Lines.Reader.TryRead(out string? line))
        {
            await child.Process.WaitForExitAsync(CancellationToken.None).WaitAsync(TimeSpan.FromSeconds(5)).ConfigureAwait(ConfigureAwaitOptions.SuppressThrowing);
            throw new InvalidOperationException($"client {child.Process.Id} ended while {step} (exit {(child.Process.HasExited ? child.Process.ExitCode.ToString(CultureInfo.InvariantCulture) : "?")}): {child.ErrorTail()}");
        }

        if (line.StartsWith("ERROR", StringComparison.Ordinal))
        {
            throw new InvalidDataException($"client {child.Process.Id} failed while {step}: {line[5..].Trim()}");
        }

        return line.StartsWith(word, StringComparison.Ordinal)
            ? line
            : throw new InvalidDataException($"client {child.Process.Id} sent '{line}' while {step}; expected {word}");
    }

    /// <summary>Kills every client at once (the run is being abandoned).</summary>
    public void Kill()
    {
        foreach (Child child in _children)
        {
            ChildProcesses.Kill(child.Process);
        }
    }

    /// <summary>Closes every client's stdin (its signal to disconnect and exit), waits up to 10 s, kills the rest; after a failure, kills them all at once.</summary>
    public async ValueTask DisposeAsync()
    {
        if (_failed)
        {
            Kill();
        }

        foreach (Child child in _children)
        {
            try
            {
                child.Process.StandardInput.Close();
            }
            catch (IOException)
            {
                // already gone
            }
        }

        using var timeout = new CancellationTokenSource(TimeSpan.FromSeconds(10));
        await Task.WhenAll(_children.Select(c => c.Process.WaitForExitAsync(timeout.Token))).ConfigureAwait(ConfigureAwaitOptions.SuppressThrowing);
        foreach (Child child in _children)
        {
            if (!child.Process.HasExited && !_failed)
            {
                Console.Error.WriteLine($"client {child.Process.Id} did not exit within 10 s of its stdin closing; killing it");
            }

            ChildProcesses.Kill(child.Process);
            ChildProcesses.Forget(child.Process);
            child.Process.Dispose();
        }

        _children.Clear();
    }

    private sealed class Child
    {
        private readonly StringBuilder _errors = new();

        public Child(Process process)
        {
            Process = process;
            _ = Task.Run(async () =>
            {
                while (await process.StandardOutput.ReadLineAsync() is { } line)
                {
                    if (line.Length > 0)
                    {
                        Lines.Writer.TryWrite(line);
                    }
                }

                Lines.Writer.TryComplete();
            });
            _ = Task.Run(async () =>
            {
                while (await process.StandardError.ReadLineAsync() is { } line)
                {
                    lock (_errors)
                    {
                        if (_errors.Length < 4096)
                        {
                            _errors.AppendLine(line);
                        }
                    }
                }
            });
        }

        public Process Process { get; }

        public Channel<string> Lines { get; } = Channel.CreateUnbounded<string>();

        public ProcessCpu? Cpu { get; set; }

        public string ErrorTail()
        {
            lock (_errors)
            {
                return _errors.Length == 0 ? "(nothing on stderr)" : _errors.ToString().ReplaceLineEndings(" | ").Trim();
            }
        }
    }
}

/// <summary>
/// Every process a benchmark starts, so that all of them end with it: each is killed by its own
/// process id (never by name) on Ctrl+C, SIGTERM or SIGHUP, and by its owner on failure.
/// </summary>
internal static class ChildProcesses
{
    private static readonly ConcurrentDictionary<Process, byte> Live = new();

    public static Process Start(ProcessStartInfo info)
    {
        Process process = Process.Start(info) ?? throw new InvalidOperationException($"could not start {info.FileName}");
        Live[process] = 0;
        return process;
    }

    public static void Forget(Process process) => Live.TryRemove(process, out _);

    public static void Kill(Process process)
    {
        try
        {
            if (!process.HasExited)
            {
                process.Kill(); // this one process, by its id
            }
        }
        catch (Exception ex) when (ex is InvalidOperationException or System.ComponentModel.Win32Exception or NotSupportedException)
        {
            // already gone
        }
    }

    public static void KillAll()
    {
        foreach (Process process in Live.Keys)
        {
            Kill(process);
        }
    }

    /// <summary>Kills every tracked process on SIGINT, SIGTERM and SIGHUP, then lets the signal end this process as it would have.</summary>
    public static IDisposable KillOnSignals(Action<string>? alsoOnSignal = null)
    {
        PosixSignalRegistration[] registrations = [.. new[] { PosixSignal.SIGINT, PosixSignal.SIGTERM, PosixSignal.SIGHUP }.Select(signal => PosixSignalRegistration.Create(signal, context =>
        {
            Console.Error.WriteLine($"{context.Signal}: ending the benchmark's processes");
            alsoOnSignal?.Invoke(context.Signal.ToString());
            KillAll();
        }))];
        return new Registrations(registrations);
    }

    private sealed class Registrations(PosixSignalRegistration[] registrations) : IDisposable
    {
        public void Dispose()
        {
            foreach (PosixSignalRegistration registration in registrations)
            {
                registration.Dispose();
            }
        }
    }
}
