using OffloadRpc.Transport;
using Xunit;

namespace OffloadRpc.Tests;

/// <summary>The budget of a gRPC server's request buffers: what it counts, what it refuses, what it gets back.</summary>
public sealed class LeaseBudgetTests
{
    [Fact]
    public void A_lease_counts_its_whole_mapping_until_it_is_disposed()
    {
        var budget = new LeaseBudget(1 << 20);
        using (SharedBuffer lease = budget.Rent(5000))
        {
            Assert.Equal(5000, lease.Length);
            Assert.Equal(8192, budget.HeldBytes); // two pages: the mapping it holds
            lease.Span.Fill(7);
        }

        Assert.Equal(0, budget.HeldBytes);
    }

    [Fact]
    public void A_lease_past_the_limit_is_refused_and_the_room_comes_back_with_the_leases()
    {
        var budget = new LeaseBudget(1 << 20);
        SharedBuffer half = budget.Rent(512 << 10);
        ArenaExhaustedException refused = Assert.Throws<ArenaExhaustedException>(() => budget.Rent(600 << 10));
        Assert.Contains("MaxBufferedRequestBytes", refused.Message, StringComparison.Ordinal);
        Assert.Equal(512 << 10, budget.HeldBytes); // the refusal took nothing

        SharedBuffer rest = budget.Rent(512 << 10); // exactly the limit
        Assert.Equal(1 << 20, budget.HeldBytes);
        Assert.Throws<ArenaExhaustedException>(() => budget.Rent(1));
        using (SharedBuffer empty = budget.Rent(0))
        {
            Assert.Equal(0, empty.Length); // an empty buffer always has room, and counts one page
        }

        half.Dispose();
        half.Dispose(); // a second dispose gives nothing back twice
        Assert.Equal(512 << 10, budget.HeldBytes);
        using (SharedBuffer again = budget.Rent(300 << 10))
        {
            Assert.Equal(1 << 20, budget.HeldBytes); // 300 KiB is a mapping of 512 KiB
        }

        rest.Dispose();
        Assert.Equal(0, budget.HeldBytes);
    }
}
