using System.Globalization;
using System.Text.Json;
using System.Text.Json.Serialization;
using Spectre.Console;

namespace OffloadRpc.Cli;

/// <summary>One client process's figures in a <see cref="ClientsRow"/>.</summary>
internal sealed record ClientFigures(
    [property: JsonPropertyName("pid")] int ProcessId,
    [property: JsonPropertyName("calls")] long Calls,
    [property: JsonPropertyName("calls_per_s")] double CallsPerSecond,
    [property: JsonPropertyName("p50_us")] double P50Microseconds,
    [property: JsonPropertyName("p99_us")] double P99Microseconds,
    [property: JsonPropertyName("max_us")] double MaxMicroseconds,
    [property: JsonPropertyName("cpu_pct")] double CpuPercent,
    [property: JsonPropertyName("late_us")] double LateMicroseconds);

/// <summary>
/// One cell of a many-clients run: N client processes against one server process, one operation,
/// one window; or (op <c>idle</c>) a server holding idle connections. CPU figures are % of one core
/// over the window (100 = one core busy all of it). The aggregate is the sum over the clients.
/// </summary>
internal sealed record ClientsRow(
    [property: JsonPropertyName("system")] string? System,
    [property: JsonPropertyName("clients")] int Clients,
    [property: JsonPropertyName("processes")] int Processes,
    [property: JsonPropertyName("op")] string Op,
    [property: JsonPropertyName("bytes")] long Bytes,
    [property: JsonPropertyName("window_s")] double WindowSeconds,
    [property: JsonPropertyName("aggregate_calls")] long AggregateCalls,
    [property: JsonPropertyName("aggregate_calls_per_s")] double AggregateCallsPerSecond,
    [property: JsonPropertyName("aggregate_gbps")] double AggregateGbps,
    [property: JsonPropertyName("p50_us_median_client")] double P50MedianClient,
    [property: JsonPropertyName("p50_us_min_client")] double P50MinClient,
    [property: JsonPropertyName("p50_us_max_client")] double P50MaxClient,
    [property: JsonPropertyName("p99_us_median_client")] double P99MedianClient,
    [property: JsonPropertyName("p99_us_worst_client")] double P99WorstClient,
    [property: JsonPropertyName("calls_per_s_min_client")] double CallsPerSecondMinClient,
    [property: JsonPropertyName("calls_per_s_max_client")] double CallsPerSecondMaxClient,
    [property: JsonPropertyName("server_cpu_pct")] double ServerCpuPercent,
    [property: JsonPropertyName("clients_cpu_pct")] double ClientsCpuPercent,
    [property: JsonPropertyName("client_cpu_pct_max")] double ClientCpuPercentMax,
    [property: JsonPropertyName("server_threads")] int ServerThreads,
    [property: JsonPropertyName("ratio_vs_one_client")] double? RatioVsOneClient,
    [property: JsonPropertyName("late_clients")] int LateClients,
    [property: JsonPropertyName("per_client")] IReadOnlyList<ClientFigures> PerClient,
    [property: JsonPropertyName("server_thread_names")] IReadOnlyDictionary<string, int>? ServerThreadNames = null)
{
    /// <summary>A cell from its window; <paramref name="oneClient"/> is the same system's and operation's one-client row of the same run, if measured.</summary>
    public static ClientsRow From(string? system, string op, long bytes, FleetWindow window, ClientsRow? oneClient)
    {
        ClientFigures[] clients = window.Clients
            .Select(c => new ClientFigures(c.ProcessId, c.Calls, c.Calls / window.Seconds, c.P50Microseconds, c.P99Microseconds, c.MaxMicroseconds, c.CpuPercent, c.LateMicroseconds))
            .ToArray();
        long calls = clients.Sum(c => c.Calls);
        double perSecond = calls / window.Seconds;
        return new ClientsRow(
            system,
            clients.Length,
            clients.Length,
            op,
            bytes,
            window.Seconds,
            calls,
            perSecond,
            perSecond * bytes / 1e9,
            Median(clients.Select(c => c.P50Microseconds)),
            clients.Min(c => c.P50Microseconds),
            clients.Max(c => c.P50Microseconds),
            Median(clients.Select(c => c.P99Microseconds)),
            clients.Max(c => c.P99Microseconds),
            clients.Min(c => c.CallsPerSecond),
            clients.Max(c => c.CallsPerSecond),
            window.ServerCpuPercent,
            clients.Sum(c => c.CpuPercent),
            clients.Max(c => c.CpuPercent),
            window.ServerThreads,
            oneClient is null || oneClient.AggregateCallsPerSecond == 0 ? (clients.Length == 1 ? 1 : null) : perSecond / oneClient.AggregateCallsPerSecond,
            clients.Count(c => c.LateMicroseconds > 0),
            clients);
    }

    /// <summary>A server holding <paramref name="connections"/> idle connections from <paramref name="processes"/> processes.</summary>
    public static ClientsRow Idle(string? system, int connections, int processes, double seconds, double serverCpuPercent, double[] clientsCpuPercent, int serverThreads, IReadOnlyDictionary<string, int> threadNames) => new(
        system, connections, processes, "idle", 0, seconds, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        serverCpuPercent, clientsCpuPercent.Sum(), clientsCpuPercent.DefaultIfEmpty(0).Max(), serverThreads, null, 0, [], threadNames);

    private static double Median(IEnumerable<double> values)
    {
        double[] sorted = values.Order().ToArray();
        return sorted.Length == 0 ? 0 : sorted.Length % 2 == 1 ? sorted[sorted.Length / 2] : (sorted[(sorted.Length / 2) - 1] + sorted[sorted.Length / 2]) / 2;
    }
}

[JsonSerializable(typeof(List<ClientsRow>))]
[JsonSourceGenerationOptions(WriteIndented = true, DefaultIgnoreCondition = JsonIgnoreCondition.WhenWritingNull)]
internal sealed partial class ClientsJson : JsonSerializerContext
{
}

/// <summary>The table and JSON of a many-clients run. The peer benchmark links this file.</summary>
internal static class ClientsReport
{
    /// <summary>The targets of an idle server: below 1% of a core and fewer than 16 threads.</summary>
    public const double IdleCpuTargetPercent = 1;

    public const int IdleThreadsTarget = 16;

    public static void Table(IReadOnlyList<ClientsRow> rows, string title)
    {
        bool systems = rows.Any(r => r.System is not null);
        var table = new Table().Border(TableBorder.Rounded).Title($"[bold]{Markup.Escape(title)}[/]");
        string[] columns = ["op", "size", "clients", "calls/s", "GB/s", "x 1 client", "client calls/s min-max", "p50 us median (min-max)", "p99 us worst", "server CPU %", "clients CPU % sum (max)", "server threads"];
        foreach (string column in systems ? ["system", .. columns] : columns)
        {
            table.AddColumn(new TableColumn(column).RightAligned());
        }

        string? lastGroup = null;
        foreach (ClientsRow row in rows.Where(r => r.Op != "idle"))
        {
            string group = $"{row.System} {row.Op} {row.Bytes}";
            if (lastGroup is not null && group != lastGroup)
            {
                table.AddEmptyRow();
            }

            lastGroup = group;
            string[] cells =
            [
                row.Op,
                Size(row.Bytes),
                row.Clients.ToString(CultureInfo.InvariantCulture),
                F0(row.AggregateCallsPerSecond),
                F(row.AggregateGbps),
                row.RatioVsOneClient is { } ratio ? ratio.ToString("0.00", CultureInfo.InvariantCulture) + "x" : "-",
                $"{F0(row.CallsPerSecondMinClient)}-{F0(row.CallsPerSecondMaxClient)}",
                $"{F(row.P50MedianClient)} ({F(row.P50MinClient)}-{F(row.P50MaxClient)})",
                F(row.P99WorstClient),
                F(row.ServerCpuPercent),
                $"{F(row.ClientsCpuPercent)} ({F(row.ClientCpuPercentMax)})",
                row.ServerThreads.ToString(CultureInfo.InvariantCulture) + (row.LateClients > 0 ? $" [yellow]({row.LateClients} late)[/]" : string.Empty),
            ];
            table.AddRow(systems ? [Markup.Escape(row.System ?? string.Empty), .. cells] : cells);
        }

        if (table.Rows.Count > 0)
        {
            AnsiConsole.Write(table);
        }

        foreach (ClientsRow row in rows.Where(r => r.LateClients > 0))
        {
            AnsiConsole.MarkupLine(Markup.Escape($"note: {row.System} {row.Op} x{row.Clients}: {row.LateClients} client(s) got the start of the window late (at most {row.PerClient.Max(c => c.LateMicroseconds):0} us) and measured less of it"));
        }

        foreach (ClientsRow row in rows.Where(r => r.Op == "idle"))
        {
            string who = row.System is null ? "server" : $"{row.System} server";
            string from = row.Processes == row.Clients ? $"{row.Clients} client processes" : $"{row.Clients} connections from {row.Processes} client processes";
            AnsiConsole.MarkupLine($"[bold]idle[/]: {Markup.Escape(who)} with {Markup.Escape(from)} connected, none calling, over {row.WindowSeconds:0.#} s:");
            AnsiConsole.MarkupLine("  " + Verdict(row.ServerCpuPercent < IdleCpuTargetPercent, $"server CPU {F(row.ServerCpuPercent)}% of a core (target < {IdleCpuTargetPercent}%)"));
            AnsiConsole.MarkupLine("  " + Verdict(row.ServerThreads < IdleThreadsTarget, $"server threads {row.ServerThreads} (target < {IdleThreadsTarget})"));
            AnsiConsole.MarkupLine(Markup.Escape($"  clients' CPU {F(row.ClientsCpuPercent)}% of a core in all (the busiest {F(row.ClientCpuPercentMax)}%)"));
            if (row.ServerThreadNames is { Count: > 0 } names)
            {
                AnsiConsole.MarkupLine(Markup.Escape("  server threads by name: " + string.Join(", ", names.OrderByDescending(n => n.Value).ThenBy(n => n.Key, StringComparer.Ordinal).Select(n => $"{n.Key} x{n.Value}"))));
            }
        }
    }

    public static Task WriteJsonAsync(IReadOnlyList<ClientsRow> rows, string path) =>
        File.WriteAllTextAsync(path, JsonSerializer.Serialize(rows.ToList(), ClientsJson.Default.ListClientsRow));

    private static string Verdict(bool met, string what) => (met ? "[green]met   [/] " : "[red]missed[/] ") + Markup.Escape(what);

    private static string Size(long bytes) => bytes switch
    {
        0 => "-",
        >= 1 << 20 when bytes % (1 << 20) == 0 => $"{bytes >> 20} MiB",
        >= 1 << 10 when bytes % (1 << 10) == 0 => $"{bytes >> 10} KiB",
        _ => $"{bytes} B",
    };

    private static string F(double value) => value switch
    {
        < 10 => value.ToString("0.00", CultureInfo.InvariantCulture),
        < 1000 => value.ToString("0.0", CultureInfo.InvariantCulture),
        _ => value.ToString("#,0", CultureInfo.InvariantCulture),
    };

    private static string F0(double value) => value.ToString("#,0", CultureInfo.InvariantCulture);
}
