using System.Text.Json;
using Xunit;

namespace OffloadRpc.Tests;

/// <summary>
/// What a row of a many-clients run (<c>offloadrpc bench --clients</c>, the peer benchmark's
/// <c>--clients</c>) must hold whatever the machine's load: every figure present, and the figures
/// agreeing with each other (the aggregate is the sum of the clients, rates follow from counts and
/// the window). No figure is judged by its size.
/// </summary>
internal static class ClientsRowChecks
{
    public static void Check(JsonElement row, int clients, long bytes)
    {
        string what = row.ToString();
        Assert.Equal(clients, row.GetProperty("clients").GetInt32());
        Assert.Equal(clients, row.GetProperty("processes").GetInt32());
        Assert.Equal(bytes, row.GetProperty("bytes").GetInt64());
        double window = row.GetProperty("window_s").GetDouble();
        Assert.True(window > 0, what);

        JsonElement[] perClient = row.GetProperty("per_client").EnumerateArray().ToArray();
        Assert.Equal(clients, perClient.Length);
        Assert.Equal(clients, perClient.Select(c => c.GetProperty("pid").GetInt32()).Distinct().Count()); // real, separate processes
        foreach (JsonElement client in perClient)
        {
            Assert.True(client.GetProperty("calls").GetInt64() > 0, what);
            double p50 = client.GetProperty("p50_us").GetDouble();
            double p99 = client.GetProperty("p99_us").GetDouble();
            Assert.True(p50 > 0 && p99 >= p50 && client.GetProperty("max_us").GetDouble() >= p99, what);
            Assert.True(client.GetProperty("cpu_pct").GetDouble() > 0, what);
            Close(client.GetProperty("calls").GetInt64() / window, client.GetProperty("calls_per_s").GetDouble(), what);
        }

        long calls = row.GetProperty("aggregate_calls").GetInt64();
        Assert.Equal(perClient.Sum(c => c.GetProperty("calls").GetInt64()), calls);
        Close(calls / window, row.GetProperty("aggregate_calls_per_s").GetDouble(), what);
        Close(calls / window * bytes / 1e9, row.GetProperty("aggregate_gbps").GetDouble(), what);
        Close(perClient.Max(c => c.GetProperty("p99_us").GetDouble()), row.GetProperty("p99_us_worst_client").GetDouble(), what);
        double medianP50 = row.GetProperty("p50_us_median_client").GetDouble();
        Assert.InRange(medianP50, perClient.Min(c => c.GetProperty("p50_us").GetDouble()), perClient.Max(c => c.GetProperty("p50_us").GetDouble()));
        Close(perClient.Min(c => c.GetProperty("calls_per_s").GetDouble()), row.GetProperty("calls_per_s_min_client").GetDouble(), what);
        Close(perClient.Max(c => c.GetProperty("calls_per_s").GetDouble()), row.GetProperty("calls_per_s_max_client").GetDouble(), what);

        double serverCpu = row.GetProperty("server_cpu_pct").GetDouble();
        Assert.True(serverCpu > 0 && double.IsFinite(serverCpu), what);
        Close(perClient.Sum(c => c.GetProperty("cpu_pct").GetDouble()), row.GetProperty("clients_cpu_pct").GetDouble(), what);
        Assert.True(row.GetProperty("server_threads").GetInt32() > 0, what);
        Assert.True(row.GetProperty("ratio_vs_one_client").GetDouble() > 0, what);
    }

    /// <summary>The rows of one operation (and system): the one-client row's ratio is 1, every other row's is its aggregate over that one's.</summary>
    public static void CheckRatio(JsonElement[] rows)
    {
        JsonElement one = Assert.Single(rows, r => r.GetProperty("clients").GetInt32() == 1);
        Assert.Equal(1, one.GetProperty("ratio_vs_one_client").GetDouble());
        foreach (JsonElement row in rows)
        {
            Close(row.GetProperty("aggregate_calls_per_s").GetDouble() / one.GetProperty("aggregate_calls_per_s").GetDouble(), row.GetProperty("ratio_vs_one_client").GetDouble(), row.ToString());
        }
    }

    private static void Close(double expected, double actual, string what) =>
        Assert.True(Math.Abs(expected - actual) <= 1e-9 * Math.Max(1, Math.Abs(expected)), $"expected {expected}, got {actual}: {what}");
}
