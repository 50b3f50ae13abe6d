using OffloadRpc.Cli;
using Spectre.Console;

namespace OffloadRpc.PeerBench;

/// <summary>What a <c>--clients</c> run measures and for how long.</summary>
internal sealed record SweepSettings(int[] Clients, string[] Systems, long[] Sizes, TimeSpan WarmUp, TimeSpan Window, TimeSpan? SpinBudget)
{
    public static readonly int[] DefaultClients = [1, 2, 4, 8, 16];

    /// <summary>The client counts measured: one client first, always (the ratios are to it), then the others given.</summary>
    public int[] Sweep => [1, .. Clients.Where(n => n != 1).Distinct()];

    /// <summary>
    /// The systems a client process can be of. <c>offloadrpc-best</c> picks its mode per cell and
    /// <c>offloadrpc-zero-copy</c> takes the producer's write out of its time, neither of which a
    /// closed loop of plain calls does; the floors have no server.
    /// </summary>
    public static readonly string[] SweepSystems = ["grpc-uds", "streamjsonrpc-uds", "offloadrpc-auto"];
}

/// <summary>
/// <c>--clients 1,2,4,8,16</c>: per system one server process (the same <see cref="Servers"/> as the
/// one-client benchmark), and per N, N client processes of that system (the same
/// <see cref="PeerClient"/>s, each in a process of its own: this program started with
/// <c>--client SYSTEM ENDPOINT</c>) calling at once in a closed loop over one window, driven by the
/// CLI's <see cref="ClientFleet"/>. Cells: <c>add</c> and <c>checksum</c> per size (1 MiB unless
/// <c>--sizes</c>); for each N every system in turn, so drift falls on all alike.
/// </summary>
internal sealed class ClientSweep : IAsyncDisposable
{
    private readonly SweepSettings _settings;
    private readonly List<(string System, ServerProcess Server, string Endpoint)> _servers = [];
    private readonly string _socketDirectory = Path.Combine(Path.GetTempPath(), $"offloadrpc-peerbench-clients-{Environment.ProcessId}");
    private int _aborted;

    public ClientSweep(SweepSettings settings) => _settings = settings;

    public static string Describe(SweepSettings s) =>
        $"{Environment.ProcessorCount} cores, .NET {Environment.Version}, client processes {string.Join(", ", s.Sweep)} per system, add and checksum {string.Join(", ", s.Sizes.Select(Report.Size))}, {s.WarmUp.TotalSeconds:0.#} s warm-up and {s.Window.TotalSeconds:0.#} s window per cell";

    public async Task<List<ClientsRow>> RunAsync()
    {
        Directory.CreateDirectory(_socketDirectory);
        foreach (string system in _settings.Systems)
        {
            (string kind, string endpoint) = system switch
            {
                "grpc-uds" => ("grpc", Path.Combine(_socketDirectory, "grpc.sock")),
                "streamjsonrpc-uds" => ("streamjsonrpc", Path.Combine(_socketDirectory, "streamjsonrpc.sock")),
                _ => ("offloadrpc", $"peerbench-clients-{Environment.ProcessId}"),
            };
            _servers.Add((system, await ServerProcess.StartAsync(kind, endpoint, _settings.SpinBudget), endpoint));
        }

        (string Op, long Bytes)[] operations = [("add", 8), .. _settings.Sizes.Select(size => ($"checksum:{size}", size))];
        var rows = new List<ClientsRow>();
        var oneClient = new Dictionary<(string, string), ClientsRow>();
        foreach (int clients in _settings.Sweep)
        {
            foreach ((string system, ServerProcess server, string endpoint) in _servers)
            {
                Status($"{system}: {clients} client process(es)");
                await using ClientFleet fleet = await ClientFleet.StartAsync(clients, _ => ServerProcess.StartInfo(["--client", system, endpoint, string.Join(',', _settings.Sizes)], _settings.SpinBudget), server.Exited);
                foreach ((string op, long bytes) in operations)
                {
                    Status($"{system}: {clients} client process(es), {op}");
                    FleetWindow window = await fleet.MeasureAsync(op, _settings.WarmUp, _settings.Window, server.ProcessId);
                    string name = op.StartsWith("checksum", StringComparison.Ordinal) ? "checksum" : op;
                    ClientsRow row = ClientsRow.From(system, name, bytes, window, oneClient.GetValueOrDefault((system, op)));
                    oneClient.TryAdd((system, op), row);
                    rows.Add(row);
                }
            }
        }

        // One table: per operation and size, per system, the client counts in order.
        return [.. rows.OrderBy(r => r.Op == "add" ? 0 : 1).ThenBy(r => r.Bytes).ThenBy(r => Array.IndexOf(_settings.Systems, r.System)).ThenBy(r => r.Clients)];
    }

    private static void Status(string what)
    {
        if (!Console.IsOutputRedirected)
        {
            AnsiConsole.MarkupLine($"[grey]{Markup.Escape(what)}[/]");
        }
    }

    /// <summary>
    /// A client process: one <see cref="PeerClient"/> of <paramref name="system"/>, checked at every
    /// size (as sent and with one byte changed) before it reports READY; then <see cref="LoadClient"/>.
    /// Every call's result is checked: <c>add</c> gets the call's number and 1, <c>checksum</c> the payload.
    /// </summary>
    public static async Task<int> RunClientAsync(string system, string endpoint, string sizes)
    {
        OffloadRpcConnection? connection = null;
        PeerClient? client = null;
        try
        {
            long[] lengths = sizes.Split(',').Select(long.Parse).ToArray();
            byte[] source = GC.AllocateUninitializedArray<byte>((int)lengths.Max(), pinned: true);
            new Random(20261125).NextBytes(source);
            client = system switch
            {
                "grpc-uds" => new GrpcPeerClient(endpoint, source),
                "streamjsonrpc-uds" => await StreamJsonRpcPeerClient.ConnectAsync(endpoint, source),
                "offloadrpc-auto" => new AutoPeerClient(connection = await OffloadRpcConnection.ConnectAsync(endpoint, Servers.OffloadOptions(SpinBudget())), source),
                _ => throw new ArgumentException($"a client process cannot be of '{system}'; the systems are {string.Join(", ", SweepSettings.SweepSystems)}"),
            };

            var operations = new Dictionary<string, Func<long, ValueTask>>
            {
                ["add"] = async i => Check(await client.InvokeAsync(Op.Add, (int)(i % 1_000_000)), (ulong)(i % 1_000_000) + 1, "add"),
            };
            foreach (long size in lengths)
            {
                int length = (int)size;
                ulong expected = PayloadChecksum.Compute(source.AsSpan(0, length));
                Check(await client.InvokeAsync(Op.Checksum, length), expected, $"checksum of {length} bytes");
                source[length / 2] ^= 0x5A; // a server that did not read the bytes cannot follow this
                Check(await client.InvokeAsync(Op.Checksum, length), PayloadChecksum.Compute(source.AsSpan(0, length)), $"checksum of {length} bytes, one changed");
                source[length / 2] ^= 0x5A;
                operations[$"checksum:{size}"] = async _ => Check(await client.InvokeAsync(Op.Checksum, length), expected, $"checksum of {length} bytes");
            }

            Check(await client.InvokeAsync(Op.Add, 41), 42, "add");
            PeerClient opened = client;
            return await LoadClient.ServeAsync(operations, async () =>
            {
                await opened.DisposeAsync();
                if (connection is not null)
                {
                    await connection.DisposeAsync();
                }
            });
        }
        catch (Exception ex) when (ex is not OutOfMemoryException)
        {
            return LoadClient.Fail(ex);
        }
    }

    private static TimeSpan? SpinBudget() =>
        double.TryParse(Environment.GetEnvironmentVariable(ServerProcess.SpinVariable), System.Globalization.CultureInfo.InvariantCulture, out double microseconds) ? TimeSpan.FromMicroseconds(microseconds) : null;

    private static void Check(ulong actual, ulong expected, string what)
    {
        if (actual != expected)
        {
            throw new InvalidDataException($"{what} returned {actual:x16}, expected {expected:x16}");
        }
    }

    /// <summary>Stops everything at once: for Ctrl+C and SIGTERM; the client processes are ended by <see cref="ChildProcesses"/>.</summary>
    public void Abort()
    {
        if (Interlocked.Exchange(ref _aborted, 1) != 0)
        {
            return;
        }

        ChildProcesses.KillAll();
        foreach ((_, ServerProcess server, _) in _servers.ToArray())
        {
            server.Kill();
        }

        DeleteSocketDirectory();
    }

    public async ValueTask DisposeAsync()
    {
        foreach ((_, ServerProcess server, _) in _servers)
        {
            await server.DisposeAsync();
        }

        DeleteSocketDirectory();
    }

    private void DeleteSocketDirectory()
    {
        try
        {
            if (Directory.Exists(_socketDirectory))
            {
                Directory.Delete(_socketDirectory, recursive: true);
            }
        }
        catch (Exception ex) when (ex is IOException or UnauthorizedAccessException)
        {
            Console.Error.WriteLine($"could not remove {_socketDirectory}: {ex.Message}");
        }
    }
}
