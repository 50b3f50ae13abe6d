using System.Buffers.Binary;
using System.Diagnostics;
using System.Globalization;
using OffloadRpc.Transport;
using Spectre.Console;

namespace OffloadRpc.Cli;

/// <summary>What <c>offloadrpc bench --clients / --idle-clients</c> measures and for how long.</summary>
internal sealed record ClientsSettings(
    int[] Clients,
    int IdleConnections,
    int IdleProcesses,
    TimeSpan WarmUp,
    TimeSpan Window,
    TimeSpan IdleWindow,
    string? JsonPath)
{
    public static readonly int[] DefaultSweep = [1, 2, 4, 8, 16];
}

/// <summary>
/// <c>offloadrpc bench --clients N[,N...]</c>: one server process and N client processes at once,
/// each calling in a closed loop (one call in flight) over the same window after a warm-up; two
/// operations, each its own cell: a 64-byte call (the server checksums the body) and a 1 MiB buffer
/// call (the server checksums every byte of the payload). Every reply is checked. Per cell: the
/// aggregate calls/s and GB/s, every client's p50/p99, the CPU time of the server and of every
/// client, the server's thread count, and the ratio to the one-client cell of the same run.
/// <c>--idle-clients N</c>: a server holding N connected, idle connections, its CPU time and threads.
/// </summary>
internal static class BenchClients
{
    public const int SmallMethod = 2;
    public const int ChecksumMethod = 3;

    private const int SmallBytes = 64;
    private const int PayloadBytes = 1 << 20;

    private static readonly (string Op, long Bytes)[] Operations = [("small", SmallBytes), ("checksum", PayloadBytes)];

    public static async Task<int> RunAsync(ClientsSettings settings)
    {
        if (Console.IsOutputRedirected && AnsiConsole.Profile.Width < 200)
        {
            AnsiConsole.Profile.Width = 200; // a log file has no terminal width: one line per row
        }

        int[] sweep = settings.Clients.Length == 0 ? [] : [1, .. settings.Clients.Where(n => n != 1).Distinct()];
        AnsiConsole.MarkupLine(Markup.Escape($"offloadrpc bench: {Environment.ProcessorCount} cores; one server process; "
            + (sweep.Length > 0 ? $"client processes {string.Join(", ", sweep)}, {settings.WarmUp.TotalSeconds:0.#} s warm-up and {settings.Window.TotalSeconds:0.#} s window per cell" : string.Empty)
            + (sweep.Length > 0 && settings.IdleConnections > 0 ? "; " : string.Empty)
            + (settings.IdleConnections > 0 ? $"{settings.IdleConnections} idle connections from {settings.IdleProcesses} processes over {settings.IdleWindow.TotalSeconds:0.#} s" : string.Empty)));

        var rows = new List<ClientsRow>();
        string endpoint = $"bench-clients-{Environment.ProcessId}";
        using IDisposable signals = ChildProcesses.KillOnSignals();
        Process server = ChildProcesses.Start(Bench.SelfStartInfo("bench-server", endpoint));
        try
        {
            if (await server.StandardOutput.ReadLineAsync().WaitAsync(TimeSpan.FromSeconds(30)) != "READY")
            {
                throw new InvalidOperationException("the bench server did not start");
            }

            Task serverExited = server.WaitForExitAsync();
            var oneClient = new Dictionary<string, ClientsRow>();
            foreach (int clients in sweep)
            {
                Status($"{clients} client process(es): starting");
                await using ClientFleet fleet = await ClientFleet.StartAsync(clients, _ => Bench.SelfStartInfo("bench-client", endpoint), serverExited);
                foreach ((string op, long bytes) in Operations)
                {
                    Status($"{clients} client process(es): {op}");
                    FleetWindow window = await fleet.MeasureAsync(op, settings.WarmUp, settings.Window, server.Id);
                    ClientsRow row = ClientsRow.From(null, op, bytes, window, oneClient.GetValueOrDefault(op));
                    oneClient.TryAdd(op, row);
                    rows.Add(row);
                }
            }

            if (settings.IdleConnections > 0)
            {
                rows.Add(await MeasureIdleAsync(settings, endpoint, server.Id, serverExited));
            }
        }
        catch (Exception ex) when (ex is not OutOfMemoryException)
        {
            ChildProcesses.KillAll(); // a failed run waits for nobody
            AnsiConsole.MarkupLine($"[red]FAILED[/] {Markup.Escape(ex.GetType().Name)}: {Markup.Escape(ex.Message)}");
            return 1;
        }
        finally
        {
            await StopAsync(server);
        }

        ClientsReport.Table(rows, "OffloadRpc: N client processes -> one server process, closed loop, one call in flight per client");
        if (settings.JsonPath is not null)
        {
            await ClientsReport.WriteJsonAsync(rows, settings.JsonPath);
            AnsiConsole.MarkupLine($"wrote {Markup.Escape(settings.JsonPath)}");
        }

        return 0;
    }

    /// <summary>The connections spread over the processes as evenly as they go; the server's CPU over the window once all are connected and settled.</summary>
    private static async Task<ClientsRow> MeasureIdleAsync(ClientsSettings settings, string endpoint, int serverId, Task serverExited)
    {
        int processes = Math.Min(settings.IdleProcesses, settings.IdleConnections);
        Status($"idle: starting {processes} client process(es) for {settings.IdleConnections} connections");
        await using ClientFleet fleet = await ClientFleet.StartAsync(
            processes,
            i => Bench.SelfStartInfo("bench-client", endpoint, "--connections", ((settings.IdleConnections / processes) + (i < settings.IdleConnections % processes ? 1 : 0)).ToString(CultureInfo.InvariantCulture)),
            serverExited);
        Status("idle: settling");
        await Task.Delay(TimeSpan.FromSeconds(2)); // the handshakes' and the pre-checks' after-effects (spinning waits, JIT) die down
        Status("idle: measuring");
        ProcessCpu serverCpu = ProcessCpu.Of(serverId);
        long start = Stopwatch.GetTimestamp();
        long server0 = serverCpu.Nanoseconds;
        long[] clients0 = fleet.CpuNanoseconds();
        int threads = ProcessThreads.Count(serverId);
        await Task.Delay(settings.IdleWindow / 2);
        threads = Math.Max(threads, ProcessThreads.Count(serverId));
        await Task.Delay(settings.IdleWindow / 2);
        double serverPercent = (serverCpu.Nanoseconds - server0) / Stopwatch.GetElapsedTime(start).TotalNanoseconds * 100;
        double[] clientsPercent = fleet.CpuPercent(clients0, start);
        double seconds = Stopwatch.GetElapsedTime(start).TotalSeconds;
        threads = Math.Max(threads, ProcessThreads.Count(serverId));
        return ClientsRow.Idle(null, settings.IdleConnections, processes, seconds, serverPercent, clientsPercent, threads, ProcessThreads.Names(serverId));
    }

    private static void Status(string what)
    {
        if (!Console.IsOutputRedirected)
        {
            AnsiConsole.MarkupLine($"[grey]{Markup.Escape(what)}[/]");
        }
    }

    private static async Task StopAsync(Process server)
    {
        try
        {
            server.StandardInput.Close();
        }
        catch (IOException)
        {
            // already gone
        }

        using var timeout = new CancellationTokenSource(TimeSpan.FromSeconds(10));
        await server.WaitForExitAsync(timeout.Token).ConfigureAwait(ConfigureAwaitOptions.SuppressThrowing);
        ChildProcesses.Kill(server);
        ChildProcesses.Forget(server);
        server.Dispose();
    }

    /// <summary>
    /// A client process: <paramref name="connections"/> connections to the server, each checked (the
    /// 1 MiB checksum as sent and with one byte changed, a small call), then <see cref="LoadClient"/>
    /// over the first one. Idle clients hold their connections and are never told to call.
    /// </summary>
    public static async Task<int> ClientAsync(string endpoint, int connections)
    {
        var open = new List<RpcConnection>();
        try
        {
            for (int i = 0; i < connections; i++)
            {
                open.Add(await Handshake.ConnectAsync(endpoint, new TransportOptions(), [], null, CancellationToken.None));
            }

            byte[] payload = GC.AllocateUninitializedArray<byte>(PayloadBytes, pinned: true);
            new Random(Environment.ProcessId).NextBytes(payload);
            ulong expected = PayloadChecksum.Compute(payload);
            byte[] body = new byte[SmallBytes];
            new Random(~Environment.ProcessId).NextBytes(body);
            foreach (RpcConnection connection in open)
            {
                await ChecksumAsync(connection, payload, expected);
                payload[PayloadBytes / 2] ^= 0x5A;
                await ChecksumAsync(connection, payload, PayloadChecksum.Compute(payload));
                payload[PayloadBytes / 2] ^= 0x5A;
                await SmallAsync(connection, body, 0);
            }

            RpcConnection first = open[0];
            var operations = new Dictionary<string, Func<long, ValueTask>>
            {
                ["small"] = i => SmallAsync(first, body, i),
                ["checksum"] = _ => ChecksumAsync(first, payload, expected),
            };
            return await LoadClient.ServeAsync(operations, async () =>
            {
                foreach (RpcConnection connection in open)
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

    /// <summary>64 bytes inline, the call's number in the first 8: the server answers their checksum.</summary>
    private static async ValueTask SmallAsync(RpcConnection connection, byte[] body, long number)
    {
        BinaryPrimitives.WriteInt64LittleEndian(body, number);
        ulong expected = PayloadChecksum.Compute(body);
        ValueTask<RpcReply> call = connection.CallAsync(SmallMethod, body, default);
        using RpcReply reply = await call;
        Check(reply, expected, "small call");
    }

    private static async ValueTask ChecksumAsync(RpcConnection connection, byte[] payload, ulong expected)
    {
        ValueTask<RpcReply> call = connection.CallAsync(ChecksumMethod, default, [OutboundPayload.Copy(payload)]);
        using RpcReply reply = await call;
        Check(reply, expected, "1 MiB checksum");
    }

    private static void Check(RpcReply reply, ulong expected, string what)
    {
        ulong actual = reply.Body.Length == 8 ? BinaryPrimitives.ReadUInt64LittleEndian(reply.Body) : 0;
        if (reply.Body.Length != 8 || actual != expected)
        {
            throw new InvalidDataException($"{what}: the server answered {actual:x16} ({reply.Body.Length} bytes), expected {expected:x16}: it did not see the bytes that were sent");
        }
    }

    /// <summary>The server's side of the two operations (the plain bench's <c>touch</c> is method 1).</summary>
    public static void Serve(IncomingCall call)
    {
        ulong checksum;
        if (call.MethodId == SmallMethod)
        {
            checksum = PayloadChecksum.Compute(call.Body);
        }
        else
        {
            using SharedBuffer lease = call.TakePayload(0);
            checksum = PayloadChecksum.Compute(lease.Span);
        }

        Span<byte> answer = stackalloc byte[8];
        BinaryPrimitives.WriteUInt64LittleEndian(answer, checksum);
        call.Reply(answer);
    }
}

/// <summary>The options of <c>bench --clients / --idle-clients</c>, checked before anything starts.</summary>
internal static class ClientsOptions
{
    private const int MostClients = 256;

    /// <summary>An error message, or null and the settings. <paramref name="clients"/>: null when not given, empty when given without a list.</summary>
    public static string? Parse(string? clients, int? idleClients, int? idleProcesses, int? windowMs, int? warmUpMs, bool quick, string? json, string? plot, out ClientsSettings? settings)
    {
        settings = null;
        int[] sweep = [];
        if (clients is { Length: 0 })
        {
            sweep = ClientsSettings.DefaultSweep;
        }
        else if (clients is not null)
        {
            sweep = clients.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries).Select(n => int.TryParse(n, NumberStyles.None, CultureInfo.InvariantCulture, out int v) ? v : -1).ToArray();
            if (sweep.Length == 0 || sweep.Any(n => n is < 1 or > MostClients))
            {
                return $"--clients takes a comma-separated list of client counts from 1 to {MostClients} (e.g. 1,2,4,8,16), or nothing for that list";
            }
        }

        if (idleClients is < 1 or > 1024)
        {
            return "--idle-clients takes a number of connections from 1 to 1024";
        }

        int idle = idleClients ?? 0;
        if (idleProcesses is not null && (idle == 0 || idleProcesses < 1 || idleProcesses > idle))
        {
            return "--idle-processes goes with --idle-clients N and takes a number from 1 to N";
        }

        if (windowMs is < 100 || warmUpMs is < 0)
        {
            return "--window-ms takes at least 100, --warmup-ms at least 0";
        }

        if (plot is not null)
        {
            return "--plot draws the per-mode run; with --clients or --idle-clients write --json instead";
        }

        if (json is not null && Path.GetDirectoryName(Path.GetFullPath(json)) is { } directory && !Directory.Exists(directory))
        {
            return $"the directory of '{json}' ({directory}) does not exist";
        }

        settings = new ClientsSettings(
            sweep,
            idle,
            idleProcesses ?? idle,
            TimeSpan.FromMilliseconds(warmUpMs ?? (quick ? 1000 : 2000)),
            TimeSpan.FromMilliseconds(windowMs ?? (quick ? 2000 : 5000)),
            TimeSpan.FromMilliseconds(windowMs ?? 5000),
            json);
        return null;
    }
}
