using System.Diagnostics;
using System.Globalization;
using System.Runtime;
using OffloadRpc.Cli;
using OffloadRpc.Transport;
using Spectre.Console;

namespace OffloadRpc.PeerBench;

/// <summary>What one run measures and for how long.</summary>
internal sealed record Settings(
    bool Quick,
    long[] Sizes,
    string[] Systems,
    TimeSpan Cell,
    TimeSpan CellWarmup,
    TimeSpan SystemWarmup,
    int MinCalls,
    int MaxCalls,
    int PingPongBatches,
    TimeSpan? SpinBudget = null)
{
    public static readonly long[] FullSizes = [64, 4 << 10, 64 << 10, 1 << 20, 16 << 20, 64 << 20, 256 << 20];

    public static readonly long[] QuickSizes = [64, 1 << 20, 16 << 20, 64 << 20];

    public static readonly string[] AllSystems = ["grpc-uds", "offloadrpc-grpc", "streamjsonrpc-uds", "offloadrpc-auto", "offloadrpc-best", "offloadrpc-zero-copy", "floor-pingpong", "floor-memcpy"];

    public static Settings Full { get; } = new(false, FullSizes, AllSystems, TimeSpan.FromSeconds(1.5), TimeSpan.FromSeconds(0.25), TimeSpan.FromSeconds(4), 20, 300_000, 1000);

    public static Settings QuickRun { get; } = new(true, QuickSizes, AllSystems, TimeSpan.FromSeconds(0.4), TimeSpan.FromSeconds(0.1), TimeSpan.FromSeconds(1.5), 5, 50_000, 200);
}

/// <summary>
/// Runs every system's server in its own process, all at once (idle servers sleep), and measures
/// the cells interleaved: for each operation and size, every system in turn, so that drift in the
/// machine's load falls on all of them alike. Before a system is timed at a size its result is
/// checked against a local reference, twice (the second time with one byte changed), and every
/// timed call's result is checked too: a system that did not move the bytes cannot produce a row.
/// </summary>
internal sealed class Runner : IAsyncDisposable
{
    private static readonly int[] WarmUpLengths = [64, 4096, 65536];

    private readonly Settings _settings;
    private readonly byte[] _source;
    private readonly List<ServerProcess> _servers = [];
    private readonly List<(PeerClient Client, ProcessCpu ServerCpu)> _clients = [];
    private OffloadRpcConnection? _offload;
    private string? _socketDirectory;

    /// <summary>No call may take longer: a server that stops answering ends the run with an error instead of hanging it.</summary>
    private static readonly TimeSpan CallTimeout = TimeSpan.FromMinutes(2);

    private readonly Timer _watchdog;
    private long _lastProgress = Stopwatch.GetTimestamp();
    private volatile string _current = "starting the servers";
    private int _aborted;

    public Runner(Settings settings)
    {
        _watchdog = new Timer(_ => CheckProgress(), null, TimeSpan.FromSeconds(5), TimeSpan.FromSeconds(5));
        _settings = settings;
        _source = GC.AllocateUninitializedArray<byte>((int)Math.Max(settings.Sizes.Max(), WarmUpLengths.Max()), pinned: true);
        new Random(20261125).NextBytes(_source);
    }

    public static string Describe(Settings settings) =>
        $"{Environment.ProcessorCount} cores, .NET {Environment.Version}, sizes {string.Join(", ", settings.Sizes.Select(Report.Size))}, {settings.Cell.TotalSeconds:0.##} s per cell";

    /// <summary>
    /// Every cell is measured in <see cref="Rounds"/> rounds of half its time, far apart in time (the
    /// whole matrix, then the whole matrix again), and the rounds' calls are pooled: a burst of load
    /// from elsewhere on a shared machine then hits part of every cell instead of all of a few.
    /// </summary>
    private const int Rounds = 2;

    public async Task<List<ResultRow>> RunAsync()
    {
        bool Wants(string system) => _settings.Systems.Contains(system);
        var pingPong = new List<(double[] RoundTrips, PingPongCpu Cpu)>();
        if (Wants("floor-pingpong"))
        {
            pingPong.Add(PingPongFloor());
        }

        var rows = new List<ResultRow>();
        if (Wants("floor-memcpy"))
        {
            rows.AddRange(_settings.Sizes.Select(MemcpyFloor));
        }

        Volatile.Write(ref _lastProgress, Stopwatch.GetTimestamp()); // the floors are done
        await StartSystemsAsync();
        Volatile.Write(ref _lastProgress, Stopwatch.GetTimestamp());

        // Two rounds: the second catches the tier-1 compiles the first one queued. On two cores a
        // JIT thread still compiling (in the client or any server) takes a core from the two threads
        // that spin on each other, and a 1 us call becomes 100 us for as long as it runs.
        foreach (TimeSpan warmUp in new[] { _settings.SystemWarmup, _settings.SystemWarmup / 3 })
        {
            foreach ((PeerClient client, _) in _clients)
            {
                await WarmUpAsync(client, warmUp);
            }
        }

        var cells = new List<(PeerClient Client, ProcessCpu ServerCpu, Op Op, int Length, ulong Expected)>();
        foreach ((PeerClient client, ProcessCpu serverCpu) in _clients)
        {
            cells.Add((client, serverCpu, Op.Add, 0, 0 + 1));
        }

        foreach (Op op in new[] { Op.Checksum, Op.Touch })
        {
            foreach (long size in _settings.Sizes)
            {
                int length = (int)size;
                ulong expected = op == Op.Checksum ? PayloadChecksum.Compute(_source.AsSpan(0, length)) : (ulong)length;
                foreach ((PeerClient client, ProcessCpu serverCpu) in _clients)
                {
                    cells.Add((client, serverCpu, op, length, expected));
                }
            }
        }

        // The systems of one operation and size take turns: first to last in the first round, last to first
        // in the second, so no system always runs right after another (whose server's threads may still be
        // winding down, whose garbage the client may still be collecting).
        int systems = _clients.Count;
        int Reversed(int i) => i - (i % systems) + (systems - 1 - (i % systems));

        var samples = new CellSample[cells.Count];
        var bestModes = new int[cells.Count];
        async Task MeasureAllAsync(Action<string> report)
        {
            for (int round = 0; round < Rounds; round++)
            {
                for (int i = 0; i < cells.Count; i++)
                {
                    int c = round % 2 == 0 ? i : Reversed(i);
                    (PeerClient client, ProcessCpu serverCpu, Op op, int length, ulong expected) = cells[c];
                    _current = $"round {round + 1}/{Rounds}: {op.ToString().ToLowerInvariant()} {(op == Op.Add ? string.Empty : Report.Size(length) + " ")}{client.System}";
                    report(_current);
                    try
                    {
                        if (round == 0 && op != Op.Add)
                        {
                            if (client is FixedModePeerClient selecting)
                            {
                                await SelectBestModeAsync(selecting, op, length, expected);
                                bestModes[c] = selecting.Selected;
                            }

                            await VerifyAsync(client, op, length, expected); // in the mode that will be measured
                        }

                        if (client is FixedModePeerClient best)
                        {
                            best.Selected = bestModes[c];
                        }

                        samples[c] = await MeasureCellAsync(client, serverCpu, op, length, expected, samples[c]);
                    }
                    catch (Exception ex) when (ex is not InvalidDataException)
                    {
                        throw new PeerFailedException($"{client.System} failed during {_current}: {ex.GetType().Name}: {ex.Message}", ex);
                    }
                }
            }
        }

        if (Console.IsOutputRedirected)
        {
            await MeasureAllAsync(_ => { }); // a log gets the table, not redraws (each would preempt a spinning thread on two cores)
        }
        else
        {
            await AnsiConsole.Progress().AutoClear(true).HideCompleted(true).StartAsync(async progress =>
            {
                ProgressTask task = progress.AddTask("measuring", maxValue: cells.Count * Rounds);
                await MeasureAllAsync(description =>
                {
                    task.Description = description;
                    task.Increment(1);
                });
            });
        }

        if (Wants("floor-pingpong"))
        {
            pingPong.Add(PingPongFloor()); // and once more at the end: the floor drifts with the machine as the systems do
            rows.Insert(0, PingPongRow(pingPong));
        }

        for (int c = 0; c < cells.Count; c++)
        {
            (PeerClient client, _, Op op, int length, _) = cells[c];
            rows.Add(samples[c].ToRow(client, op, length));
        }

        return rows;
    }

    private async Task StartSystemsAsync()
    {
        string id = $"{Environment.ProcessId}";
        string socketDirectory = _socketDirectory = Path.Combine(Path.GetTempPath(), $"offloadrpc-peerbench-{id}");
        Directory.CreateDirectory(socketDirectory);

        if (_settings.Systems.Contains("grpc-uds"))
        {
            string path = Path.Combine(socketDirectory, "grpc.sock");
            ServerProcess server = await ServerProcess.StartAsync("grpc", path);
            _servers.Add(server);
            _clients.Add((new GrpcPeerClient(path, _source), ProcessCpu.Of(server.ProcessId)));
        }

        if (_settings.Systems.Contains("offloadrpc-grpc"))
        {
            string path = Path.Combine(socketDirectory, "offloadrpc-grpc.sock");
            ServerProcess server = await ServerProcess.StartAsync("offloadrpc-grpc", path);
            _servers.Add(server);
            _clients.Add((new OffloadGrpcPeerClient(await OffloadGrpcPeerClient.ConnectAsync(path), _source), ProcessCpu.Of(server.ProcessId)));
        }

        if (_settings.Systems.Contains("streamjsonrpc-uds"))
        {
            string path = Path.Combine(socketDirectory, "streamjsonrpc.sock");
            ServerProcess server = await ServerProcess.StartAsync("streamjsonrpc", path);
            _servers.Add(server);
            _clients.Add((await StreamJsonRpcPeerClient.ConnectAsync(path, _source), ProcessCpu.Of(server.ProcessId)));
        }

        string[] ours = _settings.Systems.Where(s => s.StartsWith("offloadrpc-", StringComparison.Ordinal) && s != "offloadrpc-grpc").ToArray();
        if (ours.Length > 0)
        {
            string endpoint = $"peerbench-{id}";
            ServerProcess server = await ServerProcess.StartAsync("offloadrpc", endpoint, _settings.SpinBudget);
            _servers.Add(server);
            _offload = await OffloadRpcConnection.ConnectAsync(endpoint, Servers.OffloadOptions(_settings.SpinBudget));
            ProcessCpu cpu = ProcessCpu.Of(server.ProcessId);
            foreach (string system in ours)
            {
                PeerClient client = system switch
                {
                    "offloadrpc-auto" => new AutoPeerClient(_offload, _source),
                    "offloadrpc-best" => new FixedModePeerClient(_offload, _source),
                    _ => new ZeroCopyPeerClient(_offload, _source),
                };
                _clients.Add((client, cpu));
            }
        }
    }

    /// <summary>
    /// Runs every operation once at each size of the run, then at small and medium sizes for a while,
    /// so that both processes' code is jitted and tiered up before anything is timed.
    /// </summary>
    private async Task WarmUpAsync(PeerClient client, TimeSpan duration)
    {
        _current = $"warming up {client.System}";
        foreach (long size in _settings.Sizes)
        {
            await client.InvokeAsync(Op.Checksum, (int)size);
            await client.InvokeAsync(Op.Touch, (int)size);
            Volatile.Write(ref _lastProgress, Stopwatch.GetTimestamp());
        }

        var clock = Stopwatch.StartNew();
        int[] lengths = WarmUpLengths;
        int i = 0;
        do
        {
            int length = lengths[i % lengths.Length];
            await client.InvokeAsync(Op.Add, length);
            if (client is FixedModePeerClient best)
            {
                best.Selected = i % FixedModePeerClient.Modes.Length;
            }

            await client.InvokeAsync(Op.Checksum, length);
            await client.InvokeAsync(Op.Touch, length);
            Volatile.Write(ref _lastProgress, Stopwatch.GetTimestamp());
            i++;
        }
        while (clock.Elapsed < duration || i < 30);
    }

    /// <summary>
    /// Checks the result against the local reference, then again with one byte of the payload changed
    /// (restored after). A <c>touch</c> answers with the length whatever the bytes, so before a touch
    /// cell the same system, in the same mode, also checksums the payload: the bytes of that path moved.
    /// </summary>
    private async Task VerifyAsync(PeerClient client, Op op, int length, ulong expected)
    {
        await CheckAsync(client, op, length, expected);
        if (op == Op.Touch)
        {
            await VerifyAsync(client, Op.Checksum, length, PayloadChecksum.Compute(_source.AsSpan(0, length)));
        }

        if (length > 0)
        {
            int position = length / 2;
            byte original = _source[position];
            _source[position] = (byte)~original;
            try
            {
                await CheckAsync(client, op, length, op == Op.Checksum ? PayloadChecksum.Compute(_source.AsSpan(0, length)) : (ulong)length);
            }
            finally
            {
                _source[position] = original;
            }
        }
    }

    private async Task CheckAsync(PeerClient client, Op op, int length, ulong expected)
    {
        ulong result = await client.InvokeAsync(op, length);
        Volatile.Write(ref _lastProgress, Stopwatch.GetTimestamp());
        if (result != expected)
        {
            throw new InvalidDataException($"{client.System} {op} of {length} bytes returned {result:x16}, expected {expected:x16}: the server did not see the bytes that were sent.");
        }
    }

    /// <summary>
    /// offloadrpc-best: a short run of every fixed mode, each in a block of its own (a fixed mode
    /// runs alone in production; interleaved, a Bypass call would flush the lines an Inject call left
    /// in cache for the next one), twice, in opposite orders, so drift falls on all alike. The
    /// fastest by median is then measured as its own cell, so the row is not the luckiest of six.
    /// </summary>
    private async Task SelectBestModeAsync(FixedModePeerClient client, Op op, int length, ulong expected)
    {
        int modes = FixedModePeerClient.Modes.Length;
        var times = new List<double>[modes];
        for (int m = 0; m < modes; m++)
        {
            times[m] = [];
        }

        TimeSpan block = _settings.Cell / 2 / (2 * modes);
        for (int pass = 0; pass < 2; pass++)
        {
            for (int k = 0; k < modes; k++)
            {
                int m = pass == 0 ? k : modes - 1 - k;
                client.Selected = m;
                await CheckAsync(client, op, length, expected); // the first call of a mode pays for what the previous mode left behind
                var clock = Stopwatch.StartNew();
                for (int i = 0; i < 2 || (clock.Elapsed < block && i < _settings.MaxCalls / (2 * modes)); i++)
                {
                    long start = Stopwatch.GetTimestamp();
                    ulong result = await client.InvokeAsync(op, length);
                    times[m].Add(Stopwatch.GetElapsedTime(start).TotalMicroseconds);
                    Volatile.Write(ref _lastProgress, Stopwatch.GetTimestamp());
                    if (result != expected)
                    {
                        throw new InvalidDataException($"{client.System} ({client.Mode(op, length)}) {op} of {length} bytes returned {result:x16}, expected {expected:x16}.");
                    }
                }
            }
        }

        client.Selected = Enumerable.Range(0, modes).MinBy(m => Percentile(times[m], 0.5));
    }

    /// <summary>Measures one cell for half its time (see <see cref="Rounds"/>), adding to what earlier rounds measured.</summary>
    private async Task<CellSample> MeasureCellAsync(PeerClient client, ProcessCpu serverCpu, Op op, int length, ulong expected, CellSample? earlier)
    {
        Collect(); // what the previous cell left on the heap is not this cell's cost

        var clock = Stopwatch.StartNew();
        for (int i = 0; i < 2 || (clock.Elapsed < _settings.CellWarmup && i < _settings.MaxCalls); i++)
        {
            await CheckAsync(client, op, length, expected);
        }

        int minCalls = (_settings.MinCalls + Rounds - 1) / Rounds;
        int maxCalls = _settings.MaxCalls / Rounds;
        var latencies = new double[maxCalls];
        long excludedTicksStart = client.ExcludedTicks;
        long excludedCpuStart = client.ExcludedCpuNanoseconds;
        long clientCpuStart = ProcessCpu.Self.Nanoseconds;
        long serverCpuStart = serverCpu.Nanoseconds;
        long begin = Stopwatch.GetTimestamp();
        long deadline = begin + (long)(_settings.Cell.TotalSeconds / Rounds * Stopwatch.Frequency);
        int calls = 0;
        while (calls < minCalls || (calls < maxCalls && Stopwatch.GetTimestamp() < deadline))
        {
            long excluded = client.ExcludedTicks;
            long start = Stopwatch.GetTimestamp();
            ulong result = await client.InvokeAsync(op, length);
            long ticks = Stopwatch.GetTimestamp() - start - (client.ExcludedTicks - excluded);
            if (result != expected)
            {
                throw new InvalidDataException($"{client.System} {op} of {length} bytes returned {result:x16}, expected {expected:x16}.");
            }

            latencies[calls++] = Math.Max(1, ticks) * 1e6 / Stopwatch.Frequency;
            Volatile.Write(ref _lastProgress, start);
        }

        long excludedTicks = client.ExcludedTicks - excludedTicksStart;
        var sample = new CellSample(
            latencies[..calls],
            Stopwatch.GetTimestamp() - begin - excludedTicks,
            ProcessCpu.Self.Nanoseconds - clientCpuStart - (client.ExcludedCpuNanoseconds - excludedCpuStart),
            serverCpu.Nanoseconds - serverCpuStart,
            excludedTicks,
            client.Mode(op, length));
        return earlier is null ? sample : earlier.Merge(sample);
    }

    /// <summary>What the rounds of one cell measured: every call's latency, wall time, both processes' CPU time.</summary>
    private sealed record CellSample(double[] Latencies, long WallTicks, long ClientCpuNanoseconds, long ServerCpuNanoseconds, long ExcludedTicks, string? Mode)
    {
        public CellSample Merge(CellSample other) => new(
            [.. Latencies, .. other.Latencies],
            WallTicks + other.WallTicks,
            ClientCpuNanoseconds + other.ClientCpuNanoseconds,
            ServerCpuNanoseconds + other.ServerCpuNanoseconds,
            ExcludedTicks + other.ExcludedTicks,
            Mode);

        public ResultRow ToRow(PeerClient client, Op op, int length)
        {
            int calls = Latencies.Length;
            double p50 = Percentile(Latencies, 0.5);
            long bytes = op == Op.Add ? 8 : length;
            return new ResultRow(
                client.System,
                op.ToString().ToLowerInvariant(),
                bytes,
                p50,
                Percentile(Latencies, 0.99),
                op == Op.Add ? 0 : bytes / p50 / 1e3,
                calls / (WallTicks / (double)Stopwatch.Frequency),
                ClientCpuNanoseconds / (double)calls / 1e3,
                ServerCpuNanoseconds / (double)calls / 1e3,
                Mode,
                calls,
                ExcludedTicks > 0 ? ExcludedTicks * 1e6 / Stopwatch.Frequency / calls : null);
        }
    }

    private (double[] RoundTrips, PingPongCpu Cpu) PingPongFloor()
    {
        double[] roundTrips = PingPong.Measure((_settings.PingPongBatches + 1) / 2, 1000, (pid, fd) => ServerProcess.StartPartner(pid, fd), out PingPongCpu cpu);
        return (roundTrips, cpu);
    }

    private static ResultRow PingPongRow(List<(double[] RoundTrips, PingPongCpu Cpu)> runs)
    {
        double[] roundTrips = runs.SelectMany(r => r.RoundTrips).ToArray();
        long trips = runs.Sum(r => r.Cpu.RoundTrips);
        if (runs.Any(r => r.Cpu.PartnerNanoseconds < 0))
        {
            throw new InvalidOperationException("The ping-pong partner process did not exit cleanly, so its CPU time is unknown.");
        }

        double p50 = Percentile(roundTrips, 0.5) / 1000;
        return new ResultRow(
            "floor-pingpong",
            "handoff",
            8,
            p50,
            Percentile(roundTrips, 0.99) / 1000,
            0,
            1e6 / p50,
            runs.Sum(r => r.Cpu.ClientNanoseconds) / (double)trips / 1e3,
            runs.Sum(r => r.Cpu.PartnerNanoseconds) / (double)trips / 1e3,
            "per-round-trip means of 1000-hand-off batches",
            (int)trips);
    }

    /// <summary>Span.CopyTo from the client's array into pre-faulted shared memory: the copy every copying transfer makes at least once.</summary>
    private unsafe ResultRow MemcpyFloor(long size)
    {
        SharedMemorySegment destination = SharedMemorySegment.Create(0, Math.Max(size, 4096), "offloadrpc-peerbench-floor", populate: true);
        try
        {
            var target = new Span<byte>(destination.Base, (int)size);
            ReadOnlySpan<byte> source = _source.AsSpan(0, (int)size);
            int iterations = (int)Math.Clamp((_settings.Quick ? 1L << 30 : 4L << 30) / Math.Max(size, 4096), 5, _settings.MaxCalls);
            var times = new double[iterations];
            long cpuStart = 0;
            long begin = 0;
            for (int i = -3; i < iterations; i++)
            {
                if (i == 0)
                {
                    cpuStart = ProcessCpu.ThreadNanoseconds;
                    begin = Stopwatch.GetTimestamp();
                }

                long start = Stopwatch.GetTimestamp();
                source.CopyTo(target);
                if (i >= 0)
                {
                    times[i] = Math.Max(1, Stopwatch.GetTimestamp() - start) * 1e6 / Stopwatch.Frequency;
                }
            }

            double seconds = (Stopwatch.GetTimestamp() - begin) / (double)Stopwatch.Frequency;
            double cpu = (ProcessCpu.ThreadNanoseconds - cpuStart) / (double)iterations / 1e3;
            double p50 = Percentile(times, 0.5);
            return new ResultRow("floor-memcpy", "copy", size, p50, Percentile(times, 0.99), size / p50 / 1e3, iterations / seconds, cpu, 0, "Span.CopyTo, one thread", iterations);
        }
        finally
        {
            destination.Dispose();
        }
    }

    private static void Collect()
    {
        GCSettings.LargeObjectHeapCompactionMode = GCLargeObjectHeapCompactionMode.CompactOnce;
        GC.Collect(GC.MaxGeneration, GCCollectionMode.Forced, blocking: true, compacting: true);
        GC.WaitForPendingFinalizers();
    }

    private static double Percentile(IReadOnlyCollection<double> values, double p)
    {
        double[] sorted = values.ToArray();
        Array.Sort(sorted);
        return sorted[Math.Min(sorted.Length - 1, (int)(p * sorted.Length))];
    }

    /// <summary>
    /// Stops everything at once: the servers are killed and the socket directory removed. For Ctrl+C,
    /// SIGTERM and the watchdog; safe to call more than once and from any thread.
    /// </summary>
    public void Abort(string reason)
    {
        if (Interlocked.Exchange(ref _aborted, 1) != 0)
        {
            return;
        }

        Console.Error.WriteLine($"peer benchmark stopped: {reason}");
        foreach (ServerProcess server in _servers.ToArray())
        {
            server.Kill();
        }

        DeleteSocketDirectory();
    }

    private void CheckProgress()
    {
        if (Stopwatch.GetElapsedTime(Interlocked.Read(ref _lastProgress)) > CallTimeout)
        {
            Abort($"no call completed for {CallTimeout.TotalMinutes:0} minutes ({_current}); the servers were killed");
            Environment.Exit(3);
        }
    }

    private void DeleteSocketDirectory()
    {
        try
        {
            if (_socketDirectory is not null && Directory.Exists(_socketDirectory))
            {
                Directory.Delete(_socketDirectory, recursive: true);
            }
        }
        catch (Exception ex) when (ex is IOException or UnauthorizedAccessException)
        {
            Console.Error.WriteLine($"could not remove {_socketDirectory}: {ex.Message}");
        }
    }

    /// <summary>Closes the clients, then stops the servers and removes the socket directory, whatever fails on the way.</summary>
    public async ValueTask DisposeAsync()
    {
        await _watchdog.DisposeAsync();
        try
        {
            foreach ((PeerClient client, _) in _clients)
            {
                try
                {
                    await client.DisposeAsync();
                }
                catch (Exception ex)
                {
                    Console.Error.WriteLine($"closing the {client.System} client failed: {ex.Message}");
                }
            }

            if (_offload is not null)
            {
                try
                {
                    await _offload.DisposeAsync();
                }
                catch (Exception ex)
                {
                    Console.Error.WriteLine($"closing the OffloadRpc connection failed: {ex.Message}");
                }
            }
        }
        finally
        {
            foreach (ServerProcess server in _servers)
            {
                await server.DisposeAsync();
            }

            DeleteSocketDirectory();
        }
    }
}

/// <summary>A system failed while it was being measured (its server died, its connection broke): the message names the system and the cell.</summary>
internal sealed class PeerFailedException(string message, Exception inner) : Exception(message, inner);
