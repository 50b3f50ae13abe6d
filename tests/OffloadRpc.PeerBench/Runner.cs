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

    public static readonly string[] AllSystems = ["grpc-uds", "streamjsonrpc-uds", "offloadrpc-auto", "offloadrpc-best", "offloadrpc-zero-copy", "floor-pingpong", "floor-memcpy"];

    public static Settings Full { get; } = new(false, FullSizes, AllSystems, TimeSpan.FromSeconds(1.5), TimeSpan.FromSeconds(0.25), TimeSpan.FromSeconds(4), 10, 300_000, 1000);

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

    public Runner(Settings settings)
    {
        _settings = settings;
        _source = GC.AllocateUninitializedArray<byte>((int)Math.Max(settings.Sizes.Max(), WarmUpLengths.Max()), pinned: true);
        new Random(20261125).NextBytes(_source);
    }

    public static string Describe(Settings settings) =>
        $"{Environment.ProcessorCount} cores, .NET {Environment.Version}, sizes {string.Join(", ", settings.Sizes.Select(Report.Size))}, {settings.Cell.TotalSeconds:0.##} s per cell";

    public async Task<List<ResultRow>> RunAsync()
    {
        var rows = new List<ResultRow>();
        bool Wants(string system) => _settings.Systems.Contains(system);

        if (Wants("floor-pingpong"))
        {
            rows.Add(PingPongFloor());
        }

        if (Wants("floor-memcpy"))
        {
            rows.AddRange(_settings.Sizes.Select(MemcpyFloor));
        }

        await StartSystemsAsync();

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

        int cells = _clients.Count * (1 + (2 * _settings.Sizes.Length));
        await AnsiConsole.Progress().AutoClear(true).HideCompleted(true).StartAsync(async progress =>
        {
            ProgressTask task = progress.AddTask("measuring", maxValue: cells);
            foreach ((PeerClient client, ProcessCpu serverCpu) in _clients)
            {
                rows.Add(await MeasureCellAsync(client, serverCpu, Op.Add, 0, (ulong)(0 + 1)));
                task.Increment(1);
            }

            foreach (Op op in new[] { Op.Checksum, Op.Touch })
            {
                foreach (long size in _settings.Sizes)
                {
                    int length = (int)size;
                    ulong expected = op == Op.Checksum ? PayloadChecksum.Compute(_source.AsSpan(0, length)) : (ulong)length;
                    foreach ((PeerClient client, ProcessCpu serverCpu) in _clients)
                    {
                        task.Description = $"{op.ToString().ToLowerInvariant()} {Report.Size(size)} {client.System}";
                        await VerifyAsync(client, op, length, expected);
                        if (client is FixedModePeerClient best)
                        {
                            await SelectBestModeAsync(best, op, length, expected);
                        }

                        rows.Add(await MeasureCellAsync(client, serverCpu, op, length, expected));
                        task.Increment(1);
                    }
                }
            }
        });

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

        if (_settings.Systems.Contains("streamjsonrpc-uds"))
        {
            string path = Path.Combine(socketDirectory, "streamjsonrpc.sock");
            ServerProcess server = await ServerProcess.StartAsync("streamjsonrpc", path);
            _servers.Add(server);
            _clients.Add((await StreamJsonRpcPeerClient.ConnectAsync(path, _source), ProcessCpu.Of(server.ProcessId)));
        }

        string[] ours = _settings.Systems.Where(s => s.StartsWith("offloadrpc-", StringComparison.Ordinal)).ToArray();
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
        foreach (long size in _settings.Sizes)
        {
            await client.InvokeAsync(Op.Checksum, (int)size);
            await client.InvokeAsync(Op.Touch, (int)size);
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
            i++;
        }
        while (clock.Elapsed < duration || i < 30);
    }

    /// <summary>Checks the result against the local reference, then again with one byte of the payload changed (restored after).</summary>
    private async Task VerifyAsync(PeerClient client, Op op, int length, ulong expected)
    {
        await CheckAsync(client, op, length, expected);
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

    private static async Task CheckAsync(PeerClient client, Op op, int length, ulong expected)
    {
        ulong result = await client.InvokeAsync(op, length);
        if (result != expected)
        {
            throw new InvalidDataException($"{client.System} {op} of {length} bytes returned {result:x16}, expected {expected:x16}: the server did not see the bytes that were sent.");
        }
    }

    /// <summary>offloadrpc-best: a short interleaved run of every fixed mode; the fastest by median is then measured as its own cell (so the row is not the luckiest of six).</summary>
    private async Task SelectBestModeAsync(FixedModePeerClient client, Op op, int length, ulong expected)
    {
        int modes = FixedModePeerClient.Modes.Length;
        var times = new List<double>[modes];
        for (int m = 0; m < modes; m++)
        {
            times[m] = [];
        }

        var clock = Stopwatch.StartNew();
        TimeSpan budget = _settings.Cell / 2;
        for (int round = 0; round < 3 || (clock.Elapsed < budget && round < _settings.MaxCalls / modes); round++)
        {
            for (int m = 0; m < modes; m++)
            {
                client.Selected = m;
                long start = Stopwatch.GetTimestamp();
                ulong result = await client.InvokeAsync(op, length);
                double microseconds = Stopwatch.GetElapsedTime(start).TotalMicroseconds;
                if (result != expected)
                {
                    throw new InvalidDataException($"{client.System} ({client.Mode(op, length)}) {op} of {length} bytes returned {result:x16}, expected {expected:x16}.");
                }

                if (round > 0)
                {
                    times[m].Add(microseconds);
                }
            }
        }

        client.Selected = Enumerable.Range(0, modes).MinBy(m => Percentile(times[m], 0.5));
    }

    private async Task<ResultRow> MeasureCellAsync(PeerClient client, ProcessCpu serverCpu, Op op, int length, ulong expected)
    {
        Collect(); // what the previous cell left on the heap is not this cell's cost

        var clock = Stopwatch.StartNew();
        for (int i = 0; i < 2 || (clock.Elapsed < _settings.CellWarmup && i < _settings.MaxCalls); i++)
        {
            await CheckAsync(client, op, length, expected);
        }

        var latencies = new double[_settings.MaxCalls];
        long excludedTicksStart = client.ExcludedTicks;
        long excludedCpuStart = client.ExcludedCpuNanoseconds;
        long clientCpuStart = ProcessCpu.Self.Nanoseconds;
        long serverCpuStart = serverCpu.Nanoseconds;
        long begin = Stopwatch.GetTimestamp();
        long deadline = begin + (long)(_settings.Cell.TotalSeconds * Stopwatch.Frequency);
        int calls = 0;
        while (calls < _settings.MinCalls || (calls < _settings.MaxCalls && Stopwatch.GetTimestamp() < deadline))
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
        }

        long wallTicks = Stopwatch.GetTimestamp() - begin - (client.ExcludedTicks - excludedTicksStart);
        double clientCpu = ProcessCpu.Self.Nanoseconds - clientCpuStart - (client.ExcludedCpuNanoseconds - excludedCpuStart);
        double serverCpuSpent = serverCpu.Nanoseconds - serverCpuStart;

        double[] measured = latencies[..calls];
        double p50 = Percentile(measured, 0.5);
        long bytes = op == Op.Add ? 8 : length;
        return new ResultRow(
            client.System,
            op.ToString().ToLowerInvariant(),
            bytes,
            p50,
            Percentile(measured, 0.99),
            op == Op.Add ? 0 : bytes / p50 / 1e3,
            calls / (wallTicks / (double)Stopwatch.Frequency),
            clientCpu / calls / 1e3,
            serverCpuSpent / calls / 1e3,
            client.Mode(op, length),
            calls);
    }

    private ResultRow PingPongFloor()
    {
        double[] roundTrips = PingPong.Measure(_settings.PingPongBatches, 1000, (pid, fd) => ServerProcess.StartPartner(pid, fd), out PingPongCpu cpu);
        double p50 = Percentile(roundTrips, 0.5) / 1000;
        return new ResultRow(
            "floor-pingpong",
            "handoff",
            8,
            p50,
            Percentile(roundTrips, 0.99) / 1000,
            0,
            1e6 / p50,
            cpu.ClientNanoseconds / (double)cpu.RoundTrips / 1e3,
            cpu.PartnerNanoseconds < 0 ? double.NaN : cpu.PartnerNanoseconds / (double)cpu.RoundTrips / 1e3,
            "per-round-trip means of 1000-hand-off batches",
            (int)cpu.RoundTrips);
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
            for (int i = -3; i < iterations; i++)
            {
                long start = Stopwatch.GetTimestamp();
                source.CopyTo(target);
                if (i >= 0)
                {
                    times[i] = Math.Max(1, Stopwatch.GetTimestamp() - start) * 1e6 / Stopwatch.Frequency;
                }
            }

            double p50 = Percentile(times, 0.5);
            return new ResultRow("floor-memcpy", "copy", size, p50, Percentile(times, 0.99), size / p50 / 1e3, 1e6 / p50, p50, 0, "Span.CopyTo", iterations);
        }
        finally
        {
            destination.Release();
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

    public async ValueTask DisposeAsync()
    {
        foreach ((PeerClient client, _) in _clients)
        {
            await client.DisposeAsync();
        }

        if (_offload is not null)
        {
            await _offload.DisposeAsync();
        }

        foreach (ServerProcess server in _servers)
        {
            await server.DisposeAsync();
        }

        if (_socketDirectory is not null && Directory.Exists(_socketDirectory))
        {
            Directory.Delete(_socketDirectory, recursive: true);
        }
    }
}
