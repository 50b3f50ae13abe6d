using OffloadRpc.Tests.Infrastructure;
using Xunit;

namespace OffloadRpc.Tests;

/// <summary>
/// Many client processes on one server: every reply is the right one, the server's own threads do not
/// grow with its clients (one poller, one socket reactor), and a client that dies mid-run does not
/// stall the others.
/// </summary>
public sealed class ManyClientsTests
{
    private static readonly TimeSpan Bound = TimeSpan.FromMinutes(4);

    [Fact]
    public async Task Sixteen_client_processes_get_every_reply_right_from_one_poller_and_one_reactor()
    {
        const int Clients = 16;
        const int Calls = 20_000;
        await using RemoteServer server = RemoteServer.Start("many-clients");
        var clients = new List<PeerProcess>();
        try
        {
            for (int i = 0; i < Clients; i++)
            {
                clients.Add(PeerProcess.Start(["client-load", server.Endpoint, Calls.ToString(), "--callers", "2"]));
            }

            foreach (PeerProcess client in clients)
            {
                client.WaitForLine("READY", Bound);
            }

            // All sixteen are connected (most of them calling): the server still has one thread of each kind.
            Dictionary<string, int> threads = ThreadsOf(server.Process.Id);
            // (A second poller only while one that the machine's load stalled in a handler hands its sources over
            // to its successor, the watchdog's: both threads are "OffloadRpc poll" in /proc. Seen once under load.)
            Assert.InRange(threads.GetValueOrDefault("OffloadRpc poll"), 1, 2);
            Assert.Equal(1, threads.GetValueOrDefault("OffloadRpc sock"));
            Assert.DoesNotContain(threads.Keys, name => name.StartsWith("OffloadRpc rec", StringComparison.Ordinal));

            foreach (PeerProcess client in clients)
            {
                string result = client.WaitForLine("", Bound);
                while (result == "READY")
                {
                    result = client.WaitForLine("", Bound);
                }

                Assert.True(result == $"OK {Calls}", $"client {client.Id}: {result}\n{client.Output}");
                Assert.Equal(0, await client.WaitForExitAsync(Bound));
            }
        }
        finally
        {
            foreach (PeerProcess client in clients)
            {
                await client.DisposeAsync();
            }
        }
    }

    [Fact]
    public async Task A_client_killed_while_calling_does_not_stall_the_others_on_the_poller()
    {
        await using RemoteServer server = RemoteServer.Start("many-kill");
        await using PeerProcess victim = PeerProcess.Start(["client-load", server.Endpoint, "100000000", "--callers", "4"]);
        var survivors = new List<PeerProcess>();
        try
        {
            victim.WaitForLine("READY", Bound);
            for (int i = 0; i < 3; i++)
            {
                survivors.Add(PeerProcess.Start(["client-load", server.Endpoint, "60000", "--callers", "2"]));
            }

            foreach (PeerProcess survivor in survivors)
            {
                survivor.WaitForLine("READY", Bound);
            }

            await Task.Delay(300); // everybody is calling: the victim's calls are in flight on the server's poller
            victim.Kill();

            foreach (PeerProcess survivor in survivors)
            {
                string result = survivor.WaitForLine("OK", Bound);
                Assert.Equal("OK 60000", result);
            }

            // The server took the victim's death in stride and still admits and serves a newcomer.
            await using PeerProcess late = PeerProcess.Start(["client-load", server.Endpoint, "1000"]);
            Assert.Equal("OK 1000", late.WaitForLine("OK", Bound));
        }
        finally
        {
            foreach (PeerProcess survivor in survivors)
            {
                await survivor.DisposeAsync();
            }
        }
    }

    /// <summary>Thread names (/proc/pid/task/*/comm, 15 characters at most) and how many threads bear each.</summary>
    private static Dictionary<string, int> ThreadsOf(int pid)
    {
        var names = new Dictionary<string, int>(StringComparer.Ordinal);
        foreach (string task in Directory.EnumerateDirectories($"/proc/{pid}/task"))
        {
            try
            {
                string name = File.ReadAllText(Path.Combine(task, "comm")).TrimEnd('\n');
                names[name] = names.GetValueOrDefault(name) + 1;
            }
            catch (IOException)
            {
                // the thread ended meanwhile
            }
        }

        return names;
    }
}
